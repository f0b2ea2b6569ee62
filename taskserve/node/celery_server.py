"""The plain server: a Celery worker whose per-request work is taskserve's own.

Celery stays the worker: its consumer takes messages (``acks_late``, a prefetch of
``max_ongoing_requests``), reconnects, and answers ``celery inspect``; plain Celery
producers' calls are served like any other. What runs per request is this module's:
:meth:`CeleryServer.on_message` decodes the call (:func:`taskserve.wire.decode_call`)
and runs it by its shape:

* a sync method, with ``max_ongoing_requests=1``: at once, in the consumer's thread
  (Celery's solo pool, without its per-request layers);
* a sync method otherwise: in a thread pool of ``max_ongoing_requests`` threads;
* an ``async`` method: as a coroutine on the replica's one event loop, up to
  ``max_ongoing_requests`` at once, never tying up a thread.

Each answer is stored and its message acknowledged in one transaction
(:mod:`taskserve.node.answering`); answers finished off the consumer's thread are
written by one writer thread, those finished together in one round trip. A call that
continues a Celery canvas (chain, chord, callbacks) goes through Celery's own task
machinery instead, which runs what comes next.

Drain (SIGTERM): the consumer stops taking messages, the calls in hand finish
(:class:`DrainingPool` waits for them) and are answered, and only then does the
connection close, putting back what was taken but not started.

Example (what :meth:`taskserve.node.replica.ReplicaProcess.serve` does)::

    server = CeleryServer(replica, dispatcher, app, inflight, answerer, jobs, streams, max_deliveries=3)
    exit_code = server.serve()      # returns after SIGTERM, once the calls in hand are answered
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

from celery import signals
from celery.concurrency.solo import TaskPool as SoloPool

from ..http import HTTP_METHOD
from ..jobs import reset_job_context, set_job_context
from ..wire import STREAM_INTERRUPTED, TASK_NAME, Call, NotARequest, Outcome, call_arguments, decode_call
from .answering import Answerer, answer_duplicate, refuse_redelivery
from .inflight import InflightFile
from .invoke import ASYNC, ASYNC_GENERATOR, GENERATOR, Dispatcher
from .jobs import JobRunner, Running
from .streams import StreamWriter
from .transport import REDIS_UNREACHABLE, ReplicaConsumer, ReplicaTransport, _why

log = logging.getLogger("taskserve.node.celery_server")

# How long a drain waits at most for the calls in hand (beyond it the agent's graceful
# timeout ends the process anyway; this bound only keeps a wedged call from hanging it).
DRAIN_WAIT_S = 3600.0


class CeleryServer:
    """Serves a deployment's queue with a Celery worker; see the module docstring."""

    def __init__(self, replica: Any, dispatcher: Dispatcher, app: Any, inflight: InflightFile, answerer: Answerer,
                 jobs: JobRunner, streams: StreamWriter, max_deliveries: int, concurrency: int = 1,
                 accept_pickle: bool = False) -> None:
        self.replica = replica
        self.dispatcher = dispatcher
        self.app = app
        self.inflight = inflight
        self.answerer = answerer
        self.jobs = jobs
        self.streams = streams
        self.max_deliveries = max_deliveries
        self.concurrency = max(1, concurrency)
        self.accept_pickle = accept_pickle
        self.secret = answerer.secret
        self.executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="request") \
            if self.concurrency > 1 else None
        self.writer = AnswerWriter(self.write, self._settled)
        self.hub: Any = None
        self.busy = 0                                   # calls taken and not yet answered
        self.idle = threading.Condition()
        self.celery_serve: Optional[Callable[[Any], Any]] = None
        self.queue = ""

    # ------------------------------------------------------------------ receiving

    def on_message(self, message: Any) -> None:
        """A message from the queue (the consumer's thread)."""
        try:
            call = decode_call(message.headers, message.body, message.content_type, message.properties,
                               message.delivery_info, self.secret, self.accept_pickle)
        except NotARequest as error:
            return self._refuse(message, str(error))
        if getattr(message, "duplicate", False) and not call.redelivered:
            return answer_duplicate(self.answerer, call, message)
        self._took(call, message)
        if call.canvas and self.celery_serve is not None:
            # Celery's own machinery stores the value and sends what comes next.
            return self.celery_serve(message)
        if call.durable:
            running = self._start_job(call, message)
            if running is None:
                return self._done(call)
        else:
            running = None
            if call.expired():    # its caller (the gateway) gave up: not run, as Celery does
                return self._finish_here(Served(message, call, None), started=None)
            refusal = self._refusal(call)
            if refusal is not None:
                return self._finish_here(Served(message, call, refusal), started=None)
        shape = self.dispatcher.shape("__call__" if call.method == HTTP_METHOD else call.method)
        if call.stream or (call.method == HTTP_METHOD and shape in (GENERATOR, ASYNC_GENERATOR)):
            return self._serve_stream(call, message, shape)
        if shape in (ASYNC, ASYNC_GENERATOR):
            self.dispatcher.enter()
            self.dispatcher.loop.run(self._serve_async(call, message, running))
        elif self.executor is not None:
            self.executor.submit(self._serve_in_thread, call, message, running)
        else:
            started = time.perf_counter()
            self._finish_here(Served(message, call, self._run(call, running), running), started)

    def _start_job(self, call: Call, message: Any) -> Optional[Running]:
        return self.jobs.admit(call, message, self._refusal(call), self.dispatcher.resolve)

    def _refuse(self, message: Any, why: str) -> None:
        """A message that is not a call: a job addressed to this deployment is DEAD (its
        caller reads why), anything else is dropped with one log line."""
        if not self.jobs.bury_if_addressed(message, why):
            self.drop(message, why)

    def _took(self, call: Call, message: Any) -> None:
        with self.idle:
            self.busy += 1
        self.inflight.add(call.task_id, message.delivery_tag)
        self.replica.in_flight.took()

    def _refusal(self, call: Call) -> Optional[Outcome]:
        """The answer of a call its replicas died under too often (None to run it)."""
        if not call.redelivered:
            return None
        refusal = refuse_redelivery(self.replica.redeliveries(call.task_id), self.max_deliveries)
        if refusal is not None:
            log.error("request %s not run: %s", call.task_id, refusal.message)
        return refusal

    def drop(self, message: Any, why: str) -> None:
        log.error("dropped a message of %s: %s", self.queue or "the queue", why)
        message.reject_log_error(log, REDIS_UNREACHABLE)

    # ------------------------------------------------------------------ running

    def _run(self, call: Call, running: Optional[Running] = None) -> Outcome:
        token = set_job_context(running.context if running else None)
        try:
            return Outcome(True, self.dispatcher.call(call.method, call.args, call.kwargs))
        except Exception as error:      # the caller gets it as ReplicaError
            return Outcome.of_exception(error)
        finally:
            reset_job_context(token)

    def _serve_in_thread(self, call: Call, message: Any, running: Optional[Running]) -> None:
        started = time.perf_counter()
        outcome = self._run(call, running)
        self._count(outcome, started)
        self.writer.put(Served(message, call, outcome, running))

    async def _serve_async(self, call: Call, message: Any, running: Optional[Running]) -> None:
        started = time.perf_counter()
        set_job_context(running.context if running else None)    # this task's own context
        left = self._cancel_when_caller_leaves(call) if running is None else None   # a job has its own cancel
        try:
            outcome = Outcome(True, await self.dispatcher.call_async(call.method, call.args, call.kwargs))
        except asyncio.CancelledError:
            if not left:       # the replica is stopping: not answered, served again
                raise
            # Nobody reads this answer; it is written all the same, so nothing waits or dangles.
            outcome = Outcome.failure("Cancelled", "the caller left; the call was cancelled")
        except Exception as error:
            outcome = Outcome.of_exception(error)
        finally:
            if left is not None:
                self.streams.unwatch(call.task_id)
        self._count(outcome, started, caller_left=bool(left))
        self.writer.put(Served(message, call, outcome, running))

    def _cancel_when_caller_leaves(self, call: Call) -> list:
        """Cancel the running task (an async call's) if ``call``'s caller leaves (its cancel
        flag, asked by the stream writer); the list returned is not empty once it did."""
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        left: list = []

        def cancel() -> None:
            left.append(True)
            if task is not None:
                loop.call_soon_threadsafe(task.cancel)

        self.streams.watch(call.task_id, cancel)
        return left

    # ------------------------------------------------------------------ streams

    def _serve_stream(self, call: Call, message: Any, shape: str) -> None:
        """A streaming call (or an HTTP request to a generator ``__call__``): its chunks go
        to its stream as they are yielded. One delivered again after its replica died is
        not run again: its caller reads that it was interrupted."""
        head = None
        if call.method == HTTP_METHOD:      # the gateway reads the head, then the stream
            head = self.answerer.record(call, Outcome(True, {"status": 200, "headers": [], "stream": True}))
        if call.redelivered:
            stream = self.streams.open(call, message, head=head)
            self.streams.end(stream, Outcome.failure("ReplicaError", STREAM_INTERRUPTED), lambda: self._settled([call]))
            return
        if shape in (ASYNC, ASYNC_GENERATOR):
            self.dispatcher.enter()
            self.dispatcher.loop.run(self._stream_async(call, message, head))
        elif self.executor is not None:
            self.executor.submit(self._stream_in_thread, call, message, head)
        else:
            self._stream_in_thread(call, message, head)

    def _stream_in_thread(self, call: Call, message: Any, head: Optional[bytes]) -> None:
        stream = self.streams.open(call, message, head=head)
        started = time.perf_counter()
        outcome = Outcome(True)
        try:
            with self.dispatcher.gate.request():
                produced = self.dispatcher.begin_stream(call.method, call.args, call.kwargs)
                if inspect.isasyncgen(produced) or inspect.isawaitable(produced):
                    raise TypeError(f"{call.method} returned a coroutine or an async generator from a sync method; "
                                    "write it as `async def` to stream from it")
                chunks = produced if inspect.isgenerator(produced) else iter([produced])
                try:
                    for chunk in chunks:
                        if not self.streams.put(stream, self.dispatcher.chunk(call.method, chunk)):
                            break     # the caller left: GeneratorExit in the generator, below
                finally:
                    if inspect.isgenerator(chunks):
                        chunks.close()
        except Exception as error:
            outcome = Outcome.of_exception(error)
        self._count(outcome, started)
        self.streams.end(stream, outcome, lambda: self._settled([call]))

    async def _stream_async(self, call: Call, message: Any, head: Optional[bytes]) -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        stream = self.streams.open(call, message, head=head,
                                   on_cancel=lambda: loop.call_soon_threadsafe(task.cancel) if task else None)
        started = time.perf_counter()
        outcome, caller_left = Outcome(True), False
        try:
            produced = self.dispatcher.begin_stream(call.method, call.args, call.kwargs)
            if inspect.isasyncgen(produced):
                try:
                    async for chunk in produced:
                        if not self.streams.put(stream, self.dispatcher.chunk(call.method, chunk)):
                            break
                finally:
                    await produced.aclose()
            elif inspect.isgenerator(produced):
                for chunk in produced:
                    if not self.streams.put(stream, self.dispatcher.chunk(call.method, chunk)):
                        produced.close()
                        break
            else:
                value = await produced if inspect.isawaitable(produced) else produced
                self.streams.put(stream, self.dispatcher.chunk(call.method, value))
        except asyncio.CancelledError:
            outcome, caller_left = Outcome.failure("Cancelled", "the caller left; the generator was stopped"), True
        except Exception as error:
            outcome = Outcome.of_exception(error)
        finally:
            self.dispatcher.gate.leave()
        self._count(outcome, started, caller_left)
        self.streams.end(stream, outcome, lambda: self._settled([call]))

    def _count(self, outcome: Outcome, started: Optional[float], caller_left: bool = False) -> None:
        """Count a call served; one stopped because its caller left is no error of the code."""
        if started is not None:
            self.replica.stats.count(time.perf_counter() - started, outcome.ok or caller_left)

    # ------------------------------------------------------------------ answering

    def write(self, served: list["Served"]) -> None:
        """Store the answers of ``served`` and acknowledge their messages: plain calls'
        in one transaction, each job's with its record."""
        plain = [(item.message, item.call, item.outcome) for item in served if item.running is None]
        if plain:
            self.answerer.answer_many(plain)
        for item in served:
            if item.running is not None and item.outcome is not None:
                self.jobs.end(item.message, item.call, item.outcome, item.running)

    def _finish_here(self, served: "Served", started: Optional[float]) -> None:
        """Answer in the consumer's thread (inline calls, and calls not run)."""
        if served.outcome is not None:
            self._count(served.outcome, started)
        try:
            self.write([served])
        except REDIS_UNREACHABLE as error:
            # Unacknowledged, the request is served again once Redis is back: not lost.
            log.error("cannot store the answer to %s (%s); it is served again", served.call.task_id, _why(error))
            served.message.channel.qos.reject(served.message.delivery_tag, requeue=True)
        self._done(served.call)

    def _settled(self, calls: list[Call]) -> None:
        """Answered off the consumer's thread (by the answer writer, or a stream's end by the
        stream writer): wake the consumer, whose prefetch has room again. Without the wake, a
        replica taking one request at a time would take the next only at its loop's next
        timer (up to ``IDLE_WAKE_S``)."""
        for call in calls:
            self._done(call)
        if self.hub is not None:
            self.hub.call_soon(_nothing)

    def _done(self, call: Call) -> None:
        self.inflight.remove(call.task_id)
        with self.idle:
            self.busy -= 1
            if not self.busy:
                self.idle.notify_all()

    def wait_idle(self, timeout_s: float = DRAIN_WAIT_S) -> bool:
        """Wait until every call taken is answered; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        with self.idle:
            while self.busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.idle.wait(remaining)
        return True

    # ------------------------------------------------------------------ the worker

    def serve(self, queue_name: str) -> int:
        """Run the Celery worker on ``queue_name`` until drained; its exit code."""
        server = self
        self.queue = queue_name
        app = self.app
        app.conf.broker_transport = ReplicaTransport    # this worker's connections only

        # Canvas calls only (see on_message): Celery runs them through its tracer, which
        # stores the value and sends what comes next.
        @app.task(name=TASK_NAME, acks_late=True, bind=True)
        def call(task: Any, *args: Any, **kwargs: Any) -> Any:
            method, call_args, call_kwargs = call_arguments(args, kwargs)
            outcome = server._run(Call(task.request.id, method, call_args, call_kwargs))
            if not outcome.ok:
                raise outcome.error()
            return outcome.value

        @signals.task_postrun.connect(weak=False)
        def on_done(task_id: str = "", **_: Any) -> None:
            server._done(Call(task_id, "", [], {}))

        @signals.worker_ready.connect(weak=False)
        def on_ready(**_: Any) -> None:
            server.replica.started(server.dispatcher)

        @signals.worker_shutting_down.connect(weak=False)
        def on_shutdown(**_: Any) -> None:
            server.replica.stopping()

        # Celery logs every request and its result at INFO: costly per request, and
        # results may be private. Startup and errors still reach the log.
        for per_request in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(per_request).setLevel(logging.WARNING)
        consumer_cls = type("ServerConsumer", (ServerConsumer,), {"server": self})
        pool_cls = type("ServerPool", (DrainingPool,), {"server": self})
        worker = app.Worker(
            hostname=f"{self.replica.replica_id}@{socket.gethostname()}",
            queues=[queue_name],
            pool_cls=pool_cls,
            concurrency=self.concurrency,
            loglevel="INFO",
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            optimization="fair",
            quiet=True,
            consumer_cls=consumer_cls,
        )
        self.writer.start()
        self.streams.start()
        try:
            worker.start()
        finally:
            self.writer.stop()
            self.streams.stop()
            if self.executor is not None:
                self.executor.shutdown(wait=False)
        return worker.exitcode or 0


def _nothing() -> None:
    """A call that only wakes the consumer's loop."""


class ServerConsumer(ReplicaConsumer):
    """The replica's consumer, handing every message to its :class:`CeleryServer`, and
    holding up to ``max_ongoing_requests`` of them."""

    server: CeleryServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial_prefetch_count = self.server.concurrency

    def _update_prefetch_count(self, index: int = 0) -> Any:
        return None    # the pool never grows or shrinks: the prefetch is max_ongoing_requests

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        self.server.hub = hub

    def create_task_handler(self, promise: Any = None) -> Callable[[Any], Any]:
        self.server.celery_serve = super().create_task_handler()
        return self.server.on_message


class DrainingPool(SoloPool):
    """Celery's solo pool (for canvas calls), which on a warm stop first waits for the
    server's calls in hand: the worker stops its pool before it closes the connection,
    so their answers and acknowledgements still reach Redis."""

    server: CeleryServer

    def on_stop(self) -> None:
        if not self.server.wait_idle():
            log.warning("stopping with calls still in hand after %gs; they are put back", DRAIN_WAIT_S)
        super().on_stop()


@dataclass
class Served:
    """A call served (or not run: ``outcome`` None, it expired), to be answered."""

    message: Any
    call: Call
    outcome: Optional[Outcome]
    running: Optional[Running] = None


class AnswerWriter:
    """Writes the answers finished off the consumer's thread (thread pool, event loop):
    one thread takes every answer waiting and writes them together (``write``), so
    answers finished together cost one transaction, not one each.

    ``settled`` is called (in the writer's thread) with the calls of each round written.
    """

    def __init__(self, write: Callable[[list[Served]], None], settled: Callable[[list[Call]], None]) -> None:
        self.write = write
        self.settled = settled
        self.waiting: "queue.SimpleQueue[Optional[Served]]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="answer-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, served: Served) -> None:
        self.waiting.put(served)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.waiting.put(None)
            self.thread.join(5.0)

    def _run(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 500:
                try:
                    more = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.waiting.put(None)
                    break
                batch.append(more)
            try:
                self.write(batch)
            except REDIS_UNREACHABLE as error:
                # Unacknowledged, these requests are served again once Redis is back.
                log.error("cannot store %d answer(s) (%s); they are served again", len(batch), _why(error))
                for served in batch:
                    try:
                        served.message.channel.qos.reject(served.message.delivery_tag, requeue=True)
                    except Exception as reject_error:
                        log.error("cannot put back request %s (%s)", served.message.delivery_tag, _why(reject_error))
            except Exception:
                log.exception("storing %d answer(s) failed", len(batch))
            self.settled([served.call for served in batch])
