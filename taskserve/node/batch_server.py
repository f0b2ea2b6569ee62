"""The replica side of batching: receive requests, form batches, answer, acknowledge.

A replica whose class has :func:`taskserve.batch` methods serves its queue with a
:class:`BatchServer` instead of a Celery worker. It speaks the same protocol: the
same messages (Celery's ``taskserve.call``), the same answers (stored with the
Celery result backend, so handles and the gateway read them as before), the same
in-flight file and the same drop rules for what is not a request.

How it holds the delivery guarantees:

* **acknowledged after the batch ran**: a kombu consumer (``no_ack=False``) takes
  messages; each is acknowledged only after its answer is stored, once the batch
  it belongs to has returned (or failed);
* **redelivery of a killed batch**: every message's delivery tag is written to the
  in-flight file as it is received and removed only after its acknowledgement, so
  the node agent puts back every request a killed replica held, in a batch or
  waiting for one;
* **drain**: SIGTERM stops receiving; the batches being run finish and are
  answered; requests held but not started go back to the queue when the channel
  closes (kombu restores what is unacknowledged), as in the unbatched replica.

Threads: the main thread receives, holding at most ``max_batch_size ×
(max_concurrent_queries + 1)`` unacknowledged messages (the prefetch: the batches
run, and the next one; raised or lowered when ``set_max_batch_size`` changes it). ``max_concurrent_queries`` workers (one by
default) each take the next batch, formed one at a time (:meth:`BatchServer.next_job`,
the wait window of :func:`taskserve.batching.window_wait`), run it and answer it.
A request to a method that is not batched runs alone, in arrival order.

Example (what :meth:`taskserve.node.replica.ReplicaProcess.serve` does)::

    server = BatchServer(replica, dispatcher, app, InflightFile(path), answerer, jobs, max_deliveries=3,
                         concurrency=1, serializer="json")
    exit_code = server.serve()      # returns after SIGTERM, once the batches in hand are answered
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import kombu
import redis
from kombu.transport import virtual

from ..batching import (
    BATCH_SIZES_FIELD,
    ArrivalRate,
    BatchSettings,
    BatchSizeHistogram,
    PendingItems,
    batched_methods,
    bind_batched,
    run_batch,
    window_wait,
)
from ..connection import redis_client
from ..http import HTTP_METHOD, Request, encode_response
from ..jobs import reset_job_context, set_job_context
from ..store import queue_lists, replica_queue
from ..wire import Call, NotARequest, Outcome, decode_call
from .answering import Answerer, answer_duplicate, refuse_redelivery
from .inflight import InflightFile
from .invoke import Dispatcher
from .jobs import JobRunner, Running
from .transport import REDIS_UNREACHABLE, ReplicaChannel, ReplicaQoS, ReplicaTransport, retry_while_unreachable

log = logging.getLogger("taskserve.node.batch_server")

# The key of requests to methods that are not batched: each runs alone.
UNBATCHED = ""

# How often the receiving loop looks at the stop flag and the prefetch while idle.
RECEIVE_TIMEOUT_S = 0.25

# The replica's record gets its batch-size histogram at most this often.
HISTOGRAM_EVERY_S = 1.0

# A queue length read (for the adaptive window) that takes longer is given up on.
QUEUE_LENGTH_TIMEOUT_S = 0.5


@dataclass
class Held:
    """A request received and not yet acknowledged."""

    message: Any
    call: Call
    running: Optional[Running] = None     # a job's
    settled: bool = False      # answered (or given up on) and acknowledged
    taken_at: float = field(default_factory=time.perf_counter)

    @property
    def task_id(self) -> str:
        return self.call.task_id


class BatchQoS(ReplicaQoS):
    """The replica's acknowledgements; taking a message also reads the length of its
    queue, in the same round trip, for the adaptive window (:attr:`queue_length`)."""

    queue_length: Optional[int] = None
    taken_at = 0.0      # time.monotonic() when the last message came out of the queue

    def append(self, message: Any, delivery_tag: str) -> None:
        # Recorded as taken (ReplicaQoS.record_taken), plus the queue's length, in one round trip.
        self.taken_at = time.monotonic()
        routing_key = message.delivery_info["routing_key"]    # taskserve's queues are routed by their own name

        def lengths(pipe: Any) -> None:
            for key in queue_lists(routing_key):
                pipe.llen(key)

        replies = retry_while_unreachable(lambda: self.record_taken(message, delivery_tag, lengths),
                                          "record a request as taken")
        self.queue_length = sum(int(length) for length in replies[-len(queue_lists(routing_key)):])
        virtual.QoS.append(self, message, delivery_tag)


class BatchChannel(ReplicaChannel):
    QoS = BatchQoS


class BatchTransport(ReplicaTransport):
    """The replica's transport, with :class:`BatchQoS`."""

    Channel = BatchChannel


class BatchServer:
    """Serves a batched deployment's queue; see the module docstring."""

    def __init__(self, replica: Any, dispatcher: Dispatcher, app: Any, inflight: InflightFile, answerer: Answerer,
                 jobs: JobRunner, max_deliveries: int, concurrency: int = 1, serializer: str = "json") -> None:
        self.replica = replica
        self.answerer = answerer
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.app = app
        self.inflight = inflight
        self.max_deliveries = max_deliveries
        self.concurrency = max(1, concurrency)
        self.serializer = serializer
        self.queue = replica_queue(replica.record)
        self.bound = {name: bind_batched(dispatcher.target, name) for name in batched_methods(dispatcher.target)}
        self.cond = threading.Condition()
        self.pending: PendingItems[Held] = PendingItems()
        self.rates: dict[str, ArrivalRate] = {}
        self.unacked = 0                         # received, not yet acknowledged
        self.running = 0                         # jobs the workers run now
        self.queued: Optional[int] = None        # requests in the queue when the last one was taken
        self.stopping = threading.Event()
        self.forming = threading.Lock()          # one worker forms a batch at a time
        self.histograms = {name: BatchSizeHistogram() for name in self.bound}
        self.histogram_lock = threading.Lock()
        self.histogram_written = 0.0
        self.redis = redis_client(replica.address, socket_timeout=QUEUE_LENGTH_TIMEOUT_S,
                                  socket_connect_timeout=QUEUE_LENGTH_TIMEOUT_S)

    # ------------------------------------------------------------------ settings

    def key_of(self, method: str) -> str:
        """The batch a request to ``method`` joins: its method, or :data:`UNBATCHED`."""
        if method == HTTP_METHOD:
            return HTTP_METHOD if "__call__" in self.bound else UNBATCHED
        if method in self.bound and (method == "__call__" or not method.startswith("_")):
            return method
        return UNBATCHED

    def settings_of(self, key: str) -> BatchSettings:
        return self.bound["__call__" if key == HTTP_METHOD else key].settings

    def prefetch(self) -> int:
        """How many messages this replica holds at most: a batch per worker, and the next one.

        Taking a message costs two round trips to Redis; holding the next batch lets
        that happen while the current one runs, not after it.
        """
        return max(bound.settings.max_batch_size for bound in self.bound.values()) * (self.concurrency + 1)

    # ------------------------------------------------------------------ serving

    def serve(self) -> int:
        """Serve until SIGTERM (or SIGINT), then drain; the exit code."""
        handlers = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        workers = [threading.Thread(target=self.work, name=f"batch-worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        self.app.conf.broker_transport = BatchTransport
        connection = self.app.connection_for_read()
        try:
            connection.ensure_connection(max_retries=None, interval_start=0.1, interval_step=0.5, interval_max=2.0)
            channel = connection.channel()
            limit = self.prefetch()
            consumer = kombu.Consumer(channel, queues=[self.app.amqp.queues[self.queue]], no_ack=False,
                                      on_message=self.on_message, accept=[self.serializer], prefetch_count=limit)
            consumer.consume()
            for worker in workers:
                worker.start()
            self.replica.started(self.dispatcher)
            log.info("serving %s in batches: %s", self.queue, ", ".join(
                f"{name} (max_batch_size={b.max_batch_size}, batch_wait_timeout_s={b.batch_wait_timeout_s:g}"
                f"{', adaptive' if b.settings.adaptive else ''})" for name, b in self.bound.items()))
            self.receive(connection, channel, limit)
            self.drain(workers)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        try:
            connection.release()     # closing the channel puts back the requests held but not started
        except Exception as error:
            log.warning("could not put back the requests held but not started (%s); the node agent will", error)
        for name, sizes in self.histograms.items():
            if sizes.count:
                log.info("%s: %d batches, mean size %.1f, largest %d", name, sizes.count, sizes.mean, sizes.largest)
        return 0

    def drain(self, workers: list[threading.Thread]) -> None:
        """Let the workers finish the batches they run, and start none."""
        log.info("draining: finishing the batches in hand")
        try:
            self.replica.stopping()
        except (redis.RedisError, *REDIS_UNREACHABLE) as error:
            log.warning("cannot record that this replica drains (%s)", error)
        with self.cond:
            self.cond.notify_all()
        for worker in workers:
            worker.join()
        self.write_histograms(force=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping.set()

    def receive(self, connection: Any, channel: Any, limit: int) -> None:
        """Take messages until stopped, holding at most :meth:`prefetch` unacknowledged."""
        errors = (*connection.connection_errors, *REDIS_UNREACHABLE)
        delay = 0.1
        failing = False
        while not self.stopping.is_set():
            wanted = self.prefetch()
            if wanted != limit:
                limit = wanted
                channel.basic_qos(prefetch_count=limit)
            with self.cond:
                if self.unacked >= limit:
                    # No message is taken meanwhile: the next gap says nothing of the arrival
                    # rate, and the queue may grow unseen.
                    for rate in self.rates.values():
                        rate.paused()
                    self.queued = None
                    self.cond.wait(RECEIVE_TIMEOUT_S)
                    continue
            try:
                connection.drain_events(timeout=RECEIVE_TIMEOUT_S)
            except socket.timeout:
                continue
            except errors as error:
                if not failing:
                    log.warning("cannot take requests from %s (%s); trying again", self.queue, error)
                    failing = True
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            if failing:
                log.info("taking requests from %s again", self.queue)
                failing, delay = False, 0.1

    def on_message(self, message: Any) -> None:
        """A message taken from the queue: dropped if it is not a request, else held."""
        if self.stopping.is_set():
            return     # unacknowledged: put back when the channel closes
        try:
            call = decode_call(message.headers, message.body, message.content_type, message.properties,
                               message.delivery_info, self.answerer.secret, self.serializer == "pickle")
        except NotARequest as error:
            if not self.jobs.bury_if_addressed(message, str(error)):
                log.error("dropped a message of %s: %s", self.queue, error)
                message.reject_log_error(log, REDIS_UNREACHABLE)
            return
        if getattr(message, "duplicate", False) and not call.redelivered:
            return answer_duplicate(self.answerer, call, message)
        running = None
        if call.durable:
            refusal = refuse_redelivery(self.replica.redeliveries(call.task_id), self.max_deliveries) \
                if call.redelivered else None
            running = self.jobs.admit(call, message, refusal, self.dispatcher.resolve)
            if running is None:
                return
        held = Held(message, call, running)
        method = call.method
        self.inflight.add(held.task_id, message.delivery_tag)
        self.replica.in_flight.took()
        key = self.key_of(method)
        qos = message.channel.qos
        now = getattr(qos, "taken_at", 0.0) or time.monotonic()
        with self.cond:
            self.queued = getattr(qos, "queue_length", None)
            self.unacked += 1
            self.pending.add(key, held, now)
            self.rates.setdefault(key, ArrivalRate()).arrived(now)
            self.cond.notify_all()

    # ------------------------------------------------------------------ forming batches

    def work(self) -> None:
        """A worker: run the next batch until stopped."""
        while True:
            with self.forming:
                job = self.next_job()
            if job is None:
                return
            try:
                self.run(*job)
            except Exception as error:    # a bug here must neither end the worker nor leave a request unanswered
                log.exception("serving a batch of %s failed", job[0] or "an unbatched request")
                self.settle([(held, Outcome.of_exception(error)) for held in job[1] if not held.settled])
            finally:
                with self.cond:
                    self.running -= 1

    def next_job(self) -> Optional[tuple[str, list[Held]]]:
        """The next requests to run together: a batch, or one unbatched request; None once stopping.

        The window opens when this worker is free and the first request is there.
        """
        ready_at = time.monotonic()
        with self.cond:
            while not len(self.pending) and not self.stopping.is_set():
                self.cond.wait()
            if self.stopping.is_set():
                return None
            oldest = self.pending.oldest()
            assert oldest is not None
            key, first_at = oldest
            if key == UNBATCHED:
                self.running += 1
                return key, self.pending.take(key, 1)
            opened = max(ready_at, first_at)
            while True:
                settings = self.settings_of(key)
                held = self.pending.count(key)
                others = len(self.pending) - held + self.running
                wait = window_wait(held, settings, opened, time.monotonic(), self.rates.get(key), self.queued,
                                   others)
                if wait is None:     # not known since the receiver paused: ask Redis
                    self.cond.release()
                    try:
                        length = self.queue_length()
                    finally:
                        self.cond.acquire()
                    if self.queued is None:
                        self.queued = length
                    continue
                if wait <= 0 or self.stopping.is_set():
                    break
                self.cond.wait(wait)
            if self.stopping.is_set():
                return None
            self.running += 1
            return key, self.pending.take(key, settings.max_batch_size)

    def queue_length(self) -> int:
        """How many requests wait in the queue (0 if Redis does not say in time)."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key in queue_lists(self.queue):
                    pipe.llen(key)
                return sum(int(length) for length in pipe.execute())
        except (redis.RedisError, *REDIS_UNREACHABLE):
            return 0

    # ------------------------------------------------------------------ running them

    def run(self, key: str, items: list[Held]) -> None:
        """Run one job, then answer and acknowledge each of its requests."""
        answers: list[tuple[Held, Optional[Outcome]]] = []
        ready = [held for held in items if self.admitted(held, key, answers)]
        if key == UNBATCHED:
            answers += [(held, self.run_alone(held.call, held.running)) for held in ready]
        elif ready:
            answers += self.run_batch(key, ready)
        if answers:
            self.settle(answers)

    def run_alone(self, call: Call, running: Optional[Running] = None) -> Outcome:
        """A request to a method that is not batched: run alone (a job with its context)."""
        token = set_job_context(running.context if running else None)
        try:
            return Outcome(True, self.dispatcher.call(call.method, call.args, call.kwargs))
        except Exception as error:
            return Outcome.of_exception(error)
        finally:
            reset_job_context(token)

    def run_batch(self, key: str, ready: list[Held]) -> list[tuple[Held, Optional[Outcome]]]:
        """Call the batched method once with the items of ``ready``; their answers."""
        name = "__call__" if key == HTTP_METHOD else key
        answers: list[tuple[Held, Optional[Outcome]]] = []
        values, batch = [], []
        for held in ready:
            try:
                values.append(Request.from_payload(held.call.args[0]) if key == HTTP_METHOD else held.call.args[0])
            except Exception as error:
                answers.append((held, Outcome.of_exception(error)))
                continue
            batch.append(held)
        if batch:
            bound = self.bound[name]
            with self.dispatcher.gate.request():
                outcomes = run_batch(lambda items: self.dispatcher.loop.resolve(bound(items)), values,
                                     bound.method.__qualname__)
            answers += [(held, self.http_outcome(outcome) if key == HTTP_METHOD else outcome)
                        for held, outcome in zip(batch, outcomes)]
            self.record(name, len(batch))
        return answers

    @staticmethod
    def http_outcome(outcome: Outcome) -> Outcome:
        """An HTTP request's answer: the value as HTTP data."""
        if not outcome.ok:
            return outcome
        try:
            return Outcome(True, encode_response(outcome.value))
        except Exception as error:
            return Outcome.of_exception(error)

    def admitted(self, held: Held, key: str, answers: list[tuple[Held, Optional[Outcome]]]) -> bool:
        """Whether ``held`` runs; if not, its answer is added to ``answers`` (None: it expired)."""
        call = held.call
        if held.running is None and call.expired():
            answers.append((held, None))     # its caller (the gateway) gave up: not run, as Celery does
            return False
        if held.running is None and call.redelivered:
            refusal = refuse_redelivery(self.replica.redeliveries(call.task_id), self.max_deliveries)
            if refusal is not None:
                log.error("request %s not run: %s", call.task_id, refusal.message)
                answers.append((held, refusal))
                return False
        if key not in (UNBATCHED, HTTP_METHOD) and (len(call.args) != 1 or call.kwargs):
            answers.append((held, Outcome.failure("TypeError", (
                f"{key} is batched: each call passes exactly one item, as .remote(item); this one passed "
                f"{len(call.args)} positional and {len(call.kwargs)} keyword arguments"))))
            return False
        return True

    def settle(self, answers: list[tuple[Held, Optional[Outcome]]]) -> None:
        """Store the answers and acknowledge their messages (one transaction), then forget them."""
        now = time.perf_counter()
        for held, outcome in answers:
            if outcome is not None:
                self.replica.stats.count(now - held.taken_at, outcome.ok)
        try:
            self.answerer.answer_many([(held.message, held.call, outcome) for held, outcome in answers
                                       if held.running is None])
            for held, outcome in answers:
                if held.running is not None and outcome is not None:
                    self.jobs.end(held.message, held.call, outcome, held.running)
        except Exception as error:     # after retrying for ACK_RETRY_S while Redis was unreachable
            log.error("could not store the answers to %d requests (%s); they are served again", len(answers), error)
        for held, _ in answers:
            self.inflight.remove(held.task_id)
            held.settled = True
        with self.cond:
            self.unacked -= len(answers)
            self.cond.notify_all()

    # ------------------------------------------------------------------ batch sizes

    def record(self, name: str, size: int) -> None:
        with self.histogram_lock:
            self.histograms[name].observe(size)
        self.write_histograms()

    def write_histograms(self, force: bool = False) -> None:
        """Put the batch-size histograms in the replica's record (:data:`BATCH_SIZES_FIELD`), at most
        once per :data:`HISTOGRAM_EVERY_S` unless ``force``."""
        now = time.monotonic()
        with self.histogram_lock:
            if not force and now - self.histogram_written < HISTOGRAM_EVERY_S:
                return
            self.histogram_written = now
            text = json.dumps({name: sizes.to_dict() for name, sizes in self.histograms.items() if sizes.count})
        try:
            self.replica.store.update_replica(self.replica.replica_id, **{BATCH_SIZES_FIELD: text})
        except (redis.RedisError, *REDIS_UNREACHABLE) as error:
            log.warning("cannot record the batch sizes (%s)", error)
