"""The replica process: load the code, construct it, then serve its queue.

A node agent starts one per replica::

    python -m taskserve.node.replica --address redis://127.0.0.1:6379/0 --replica-id echo-1a2b3c4d

The order is what makes a replica safe to route to: the constructor (and
``reconfigure``) run first; only then does the Celery worker start consuming the
deployment's queue, and ``RUNNING`` is recorded when it does. SIGTERM drains: the
worker stops taking messages, finishes the one it serves and exits; a message it
held but had not started goes back to the queue. A class with ``@taskserve.batch``
methods is served by :class:`~taskserve.node.batcher.BatchServer` instead, with the
same guarantees.

Faults it rides out: ``check_health()`` runs beside the requests, in a thread of its
own with a time limit, so a hung one holds up nothing and counts as a failure; a
queue item that is not a taskserve request is dropped with one log line saying why;
a request its replicas died serving ``max_deliveries`` times is answered with a
``ReplicaCrashed`` error instead of being run again; storing a result and
acknowledging the message are retried while Redis restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent import futures
from typing import Any, Callable, Iterator, Optional, TypeVar

import redis
from celery import signals, states
from celery.exceptions import Reject
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from vine import promise

from ..batching import batched_methods
from ..canary import count_request
from ..celery_app import DEFAULT_RESULT_EXPIRES_S, TASK_NAME, make_app
from ..code import unpack
from ..connection import ADDRESS_ENV, make_store
from ..errors import SecretNotConfigured, SignatureError
from ..http import HTTP_METHOD, Request, Response, encode_response
from ..planner import RECONFIGURE_FAILED_MARK
from ..signing import check_user_config, manifest, node_secret
from ..state import Replica, ReplicaState
from ..store import Store, replica_queue
from .gate import RequestGate
from .inflight import InflightFile
from .processes import die_with_parent, hold_lock
from .protocol import EXIT_CONSTRUCTOR_FAILED, INFLIGHT_FILE_ENV

log = logging.getLogger("taskserve.node.replica")


HEALTH_FAILURES_TO_REPLACE = 3

# A request whose replica died this many times is answered with an error, unless
# the deployment says (max_deliveries).
DEFAULT_MAX_DELIVERIES = 3

# How long an acknowledgement keeps retrying while Redis is unreachable (say, restarting).
ACK_RETRY_S = 30.0

# The consumer's reconnection attempts after Redis went away: 0.1 s, then 0.2 s more each
# time, at most 1 s apart (Celery's own: 2, 4, 6 ... 30 s, so a replica resumed serving
# up to 12 s after a restarted Redis was back).
RECONNECT_INTERVALS_S = {"interval_start": 0.1, "interval_step": 0.2, "interval_max": 1.0}

# What a Redis that is down or restarting raises (BusyLoadingError is a ConnectionError).
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

T = TypeVar("T")

# How often a replica re-reads its record even without a wake-up, so one that
# missed a reconfigure message (its push lost to a Redis failure) catches up. Nothing
# else reads it: liveness is the agent's heartbeat, and every config change wakes it.
CONTROL_HEARTBEAT_S = 10.0

# How often a replica adds what it counted (requests, errors, latency) to its
# deployment's stats: one pipelined round trip, whatever the number of requests.
STATS_FLUSH_S = 0.5

# How often the stats tick comes while the replica is idle (nothing counted, no request
# held): it has nothing to write, and its first request wakes it at once (count, took).
STATS_IDLE_S = 10.0

# How long the consumer's BRPOP on an empty queue blocks before it is sent again (kombu's
# default: 1 s, a wake-up a second per idle replica). A drain does not wait it out:
# closing the channel ends it (ReplicaChannel.close). A message pushed meanwhile wakes it at once.
BRPOP_TIMEOUT_S = 10

# How long the worker's event loop (kombu's hub) sleeps while nothing happens (kombu's
# own: 1 s, one wake-up a second per idle replica). Whatever has work for it wakes it
# at once: its sockets, a call from another thread, and a stop signal (quiet_hub).
IDLE_WAKE_S = 10.0

# How soon a replica that could not read its record (Redis away) tries again.
REDIS_RETRY_S = 1.0

# How often at most a replica that turns busy tells the controller at once (InFlightReport).
BUSY_WAKE_S = 1.0


class RequestStats:
    """Counts the requests this replica serves in memory; :meth:`start` adds the counts
    to the deployment's stats hash every ``STATS_FLUSH_S`` (the canary's automatic abort
    and ``status().canary`` read them), so counting costs no round trip per request.

    Counts a flush could not write (Redis away) are kept for the next one. While the
    replica is idle the tick comes only every ``STATS_IDLE_S``; the first request
    counted after that wakes it, so its count is written as soon as it would have been.

    >>> import fakeredis
    >>> stats = RequestStats(Store(fakeredis.FakeRedis()), "echo", "1")
    >>> stats.flush(), stats.idle_after_tick(busy=False)
    (False, True)
    >>> stats.count(0.002, ok=True); stats.wake.is_set()     # an idle tick is woken at once
    True
    >>> stats.flush(), stats.store.stats("echo")["requests:1"]
    (True, 1)
    """

    def __init__(self, store: Store, deployment: str, version: str) -> None:
        self.store = store
        self.deployment = deployment
        self.version = version
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        # More work for the same tick (InFlightReport.report): True while it has some.
        self.also: list[Callable[[], bool]] = []
        self.wake = threading.Event()                # a tick now, not at the end of the sleep
        self.idle = False                            # the tick sleeps STATS_IDLE_S

    def count(self, seconds: float, ok: bool) -> None:
        with self.lock:
            count_request(self.counts, self.version, seconds, ok)
            if self.idle:
                self.idle = False
                self.wake.set()

    def flush(self) -> bool:
        """Add the counts to the stats; True if there were any."""
        with self.lock:
            counts, self.counts = self.counts, {}
        if not counts:
            return False
        try:
            self.store.add_stats(self.deployment, counts)
        except redis.RedisError as error:
            log.warning("cannot add this replica's request counts to the stats (%s); trying again", error)
            with self.lock:
                for key, value in counts.items():
                    self.counts[key] = self.counts.get(key, 0) + value
        return True

    def idle_after_tick(self, busy: bool) -> bool:
        """Whether the next tick may sleep ``STATS_IDLE_S``: the tick found nothing to do
        (``busy`` False) and nothing was counted since."""
        with self.lock:
            self.idle = not busy and not self.counts
            return self.idle

    def start(self) -> None:
        def loop() -> None:
            busy = True
            while True:
                self.wake.wait(STATS_IDLE_S if self.idle_after_tick(busy) else STATS_FLUSH_S)
                self.wake.clear()
                busy = self.flush()
                for work in self.also:
                    busy = work() or busy

        threading.Thread(target=loop, name="request_stats", daemon=True).start()


class InFlightReport:
    """Keeps the ``in_flight`` field of this replica's record near the number of requests
    it holds (its in-flight file's), for a scale-down to stop idle replicas before busy
    ones (:func:`taskserve.autoscaler.choose_replicas_to_remove`).

    :meth:`report` runs on the stats' tick and writes only when the number changed since
    its last write: nothing while idle or steady, at most one write per ``STATS_FLUSH_S``
    while it moves, never a round trip per request. The field may be that old.

    A replica that was idle and takes a request (:meth:`took`, at most once per
    ``BUSY_WAKE_S``) brings the tick forward and tells the controller: this is how it
    learns at once that an idle deployment got load, without looking at idle queues.

    >>> import fakeredis, tempfile, os
    >>> from taskserve.state import Replica
    >>> store = Store(fakeredis.FakeRedis())
    >>> store.create_replica(Replica("echo-1", "echo", "s", "v1"))
    >>> held = InflightFile(os.path.join(tempfile.mkdtemp(), "echo-1.inflight"))
    >>> report = InFlightReport(store, "echo-1", held)
    >>> held.add("task-1", "tag-1"); report.report(); store.get_replica("echo-1").in_flight
    True
    1
    >>> held.remove("task-1"); report.report(); store.get_replica("echo-1").in_flight
    True
    0
    >>> report.report()           # idle: nothing to write, the stats tick may sleep long
    False
    """

    def __init__(self, store: Store, replica_id: str, inflight: InflightFile, deployment: str = "",
                 wake: Optional[threading.Event] = None) -> None:
        self.store = store
        self.replica_id = replica_id
        self.inflight = inflight
        self.deployment = deployment
        self.wake = wake
        self.written = 0            # what the record says (a new record says 0)
        self.woken_at = -BUSY_WAKE_S

    def took(self) -> None:
        """A request arrived (called per request: no I/O here)."""
        if self.wake is None or self.written:
            return
        now = time.monotonic()
        if now - self.woken_at >= BUSY_WAKE_S:
            self.woken_at = now
            self.wake.set()

    def report(self) -> bool:
        """Write the number held if it changed; True while requests are held or it could
        not be written (the stats tick then stays short)."""
        held = len(self.inflight.tags)
        if held == self.written:
            return bool(held)
        try:
            self.store.update_replica(self.replica_id, in_flight=held)
            if not self.written and self.deployment:
                self.store.notify(f"load:{self.deployment}")
        except redis.RedisError as error:
            log.warning("cannot record how many requests this replica holds (%s); trying again", error)
            return True
        self.written = held
        return True


class HealthCheckTimeout(Exception):
    """``check_health()`` did not return in time: a failure like an exception."""


class Dispatcher:
    """Calls the user's object for each request.

    >>> dispatcher = Dispatcher(lambda name: f"hi {name}", kind="function")
    >>> dispatcher("__call__", ["bob"], {})
    'hi bob'
    """

    def __init__(self, target: Any, kind: str) -> None:
        self.target = target
        self.kind = kind
        self.gate = RequestGate()
        self._health_check: Optional[futures.Future] = None

    def __call__(self, method: str, args: list, kwargs: dict) -> Any:
        with self.gate.request():
            return self._call(method, args, kwargs)

    def has(self, method: str) -> bool:
        return self.kind == "class" and callable(getattr(self.target, method, None))

    def check_health(self, wait_s: float, timeout_s: float) -> Optional[bool]:
        """Run the object's ``check_health()`` alongside the requests in progress.

        Returns True if it passed, None if ``reconfigure`` held the object for
        ``wait_s`` (not a failure). Raises :class:`HealthCheckTimeout` if it did not
        return within ``timeout_s``, else what ``check_health`` raised.

        The check runs in a thread of its own, so a hung one holds up nothing but
        itself; a check still running from last time is waited for, not started again.
        """
        if not self.has("check_health"):
            return True
        if not self.gate.try_enter(timeout=wait_s):
            return None
        try:
            check = self._health_check
            if check is None:
                check = self._health_check = _in_thread(lambda: _run(self.target.check_health()), "check_health")
            if not futures.wait([check], timeout=timeout_s).done:
                raise HealthCheckTimeout(f"check_health did not return within {timeout_s:g}s")
            self._health_check = None
            check.result()
            return True
        finally:
            self.gate.leave()

    def reconfigure(self, user_config: Any) -> None:
        """Call ``reconfigure(user_config)`` with no request in flight."""
        with self.gate.exclusive():
            _run(self.target.reconfigure(user_config))

    def _call(self, method: str, args: list, kwargs: dict) -> Any:
        if method == HTTP_METHOD:   # from the gateway: __call__(Request), the answer as HTTP data
            return encode_response(_run(self.target(Request.from_payload(args[0]))))
        if method == "__call__":
            function = self.target
        elif self.kind == "function":
            raise AttributeError(f"function deployments have no method {method!r}; call the handle directly")
        elif method.startswith("_"):
            raise AttributeError(f"method {method!r} is private; only public methods and __call__ can be called")
        else:
            function = getattr(self.target, method, None)
            if not callable(function):
                public = sorted(n for n in dir(self.target) if not n.startswith("_")
                                and callable(getattr(self.target, n, None)))
                raise AttributeError(f"{type(self.target).__name__} has no method {method!r}; "
                                     f"its public methods: {', '.join(public) or 'none'}")
        return handle_value(_run(function(*args, **kwargs)))


class ReconfigureFailed(Exception):
    """``reconfigure(user_config)`` raised while the replica started (the cause)."""


def handle_value(value: Any) -> Any:
    """What a handle caller gets for ``value``: an HTTP ``Response`` gives its body.

    >>> handle_value(Response({"ok": True}, status=201))
    {'ok': True}
    >>> handle_value(Response(b"raw"))
    'raw'
    """
    if not isinstance(value, Response):
        return value
    body = value.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise TypeError(
                f"the method returned a taskserve.http.Response ({value.status}) with a binary body, which a "
                "handle caller cannot receive as JSON; return the data itself for handle calls"
            ) from None
    return body


def _in_thread(function: Callable[[], T], name: str) -> "futures.Future[T]":
    """Run ``function`` in a new daemon thread (one that never holds up the exit); its future."""
    future: futures.Future = futures.Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class HealthWatch:
    """Runs ``check_health()`` and counts its failures in a row.

    :meth:`check` returns why the replica should be replaced once ``limit``
    checks in a row failed (raised, or did not return within ``timeout_s``), and
    again after each further failure.

    >>> class Sick:
    ...     def check_health(self):
    ...         raise RuntimeError("out of memory")
    >>> watch = HealthWatch(Dispatcher(Sick(), "class"), wait_s=1, timeout_s=5, limit=2)
    >>> watch.check() is None
    True
    >>> watch.check().splitlines()[0]
    'check_health failed 2 times in a row: Traceback (most recent call last):'
    """

    def __init__(self, dispatcher: Dispatcher, wait_s: float, timeout_s: float,
                 limit: int = HEALTH_FAILURES_TO_REPLACE) -> None:
        self.dispatcher = dispatcher
        self.wait_s = wait_s
        self.timeout_s = timeout_s
        self.limit = limit
        self.failures = 0

    def check(self) -> Optional[str]:
        """One check; the reason to be replaced once there are ``limit`` failures in a row."""
        try:
            passed = self.dispatcher.check_health(wait_s=self.wait_s, timeout_s=self.timeout_s)
        except HealthCheckTimeout as error:
            text = str(error)
        except Exception as error:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        else:
            if passed:
                self.failures = 0
            return None
        self.failures += 1
        log.warning("check_health failed (%d in a row): %s", self.failures, text)
        if self.failures >= self.limit:
            return f"check_health failed {self.failures} times in a row: {text}"
        return None


def _run(result: Any) -> Any:
    """The value of ``result``, awaiting it if the user's method was ``async``."""
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def align_thread_pools() -> None:
    """Give OpenCV and PyTorch the same thread limit as OMP_NUM_THREADS.

    Both size their own pools when imported, so one imported before the limit
    changed (say by ``os.environ`` in ``__init__``) would keep its old size.
    """
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if not limit.isdigit():
        return
    threads = int(limit)
    if "cv2" in sys.modules and hasattr(sys.modules["cv2"], "setNumThreads"):
        sys.modules["cv2"].setNumThreads(threads)
        log.info("OpenCV imported: cv2.setNumThreads(%d) to match OMP_NUM_THREADS", threads)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads") and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("PyTorch imported: torch.set_num_threads(%d) to match OMP_NUM_THREADS", threads)


def construct(target: Any, kind: str, init_args: tuple, init_kwargs: dict) -> Any:
    """The object requests are served by: an instance of a class, or the function."""
    if kind == "function":
        return target
    return target(*init_args, **init_kwargs)


class ReplicaProcess:
    """One replica: its record, its user object and its Celery worker."""

    def __init__(self, store: Store, address: str, replica_id: str) -> None:
        self.store = store
        self.address = address
        self.replica_id = replica_id
        record = store.get_replica(replica_id)
        if record is None:
            raise SystemExit(f"replica {replica_id} has no record in Redis; nothing to run")
        self.record = record
        self.config = json.loads(record.config)
        self.inflight_path = os.environ.get(INFLIGHT_FILE_ENV, "")
        self.applied_config_hash = ""
        self.draining = False
        self.stats = RequestStats(store, record.deployment, record.version)

    def load(self) -> Dispatcher:
        """Construct the object and give it its user_config: all before any request."""
        # Checked before anything is unpickled: signed with the cluster's secret, for this
        # deployment, serializer, kind and runtime_env.
        target, init_args, init_kwargs = unpack(self.store.get_code(self.record.code_sha), node_secret(),
                                                manifest(self.record.deployment, self.config))
        kind = self.config.get("kind", "class")
        dispatcher = Dispatcher(construct(target, kind, init_args, init_kwargs), kind)
        align_thread_pools()
        record = self.store.get_replica(self.replica_id) or self.record
        if record.config_hash:
            self.check_config(record)     # unsigned: fails the start, as unsigned code does
            try:
                dispatcher.reconfigure(json.loads(record.user_config))
            except Exception as error:
                raise ReconfigureFailed() from error
        self.applied_config_hash = record.config_hash
        self.store.update_replica(self.replica_id, applied_config_hash=record.config_hash)
        return dispatcher

    def follow_config(self, dispatcher: Dispatcher) -> None:
        """Apply each new user_config the controller gives this replica, in place.

        Woken by a control message, and re-reading the record every ``CONTROL_HEARTBEAT_S`` anyway.
        """
        rejected: Optional[str] = None     # the hash of a config reconfigure refused

        def loop() -> None:
            nonlocal rejected
            while not self.draining:
                try:
                    self.store.wait_for_control(self.replica_id, CONTROL_HEARTBEAT_S)
                    record = self.store.get_replica(self.replica_id)
                except redis.RedisError as error:
                    log.warning("cannot read this replica's record (%s); retrying", error)
                    time.sleep(REDIS_RETRY_S)
                    continue
                if record is None or self.draining:
                    return
                if record.config_hash in (self.applied_config_hash, rejected):
                    continue
                if self.apply_config(dispatcher, record):
                    rejected = None
                else:
                    rejected = record.config_hash

        threading.Thread(target=loop, name="follow_config", daemon=True).start()

    def check_config(self, record: Replica) -> None:
        """Refuse (:class:`SignatureError`) a user_config its client did not sign for this
        deployment and the code this process loaded (``self.record``, not a record
        re-read since: that one may have been rewritten)."""
        check_user_config(self.record.deployment, self.record.code_sha, json.loads(record.user_config),
                          record.user_config_signature, node_secret())

    def apply_config(self, dispatcher: Dispatcher, record: Replica) -> bool:
        """Run ``reconfigure`` with the record's user_config; record the outcome.

        A user_config set back to None calls nothing (``reconfigure`` only ever gets a
        config); the replica just acknowledges it.
        """
        if not record.config_hash:
            self.applied_config_hash = ""
            self.store.update_replica(self.replica_id, applied_config_hash="", config_error="")
            self.store.notify(f"replica:{self.record.deployment}")
            return True
        try:
            self.check_config(record)
        except (SignatureError, SecretNotConfigured) as error:
            # Not given to reconfigure(): the replica serves on with the config it has.
            log.error("refused user_config %s: %s", record.config_hash, error)
            self.store.update_replica(self.replica_id, config_error=str(error))
            self.store.notify(f"replica:{self.record.deployment}")
            return False
        self.store.update_replica(self.replica_id, state=ReplicaState.RECONFIGURING)
        self.store.notify(f"replica:{self.record.deployment}")
        try:
            dispatcher.reconfigure(json.loads(record.user_config))
        except Exception as error:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            log.error("reconfigure rejected user_config %s:\n%s", record.config_hash, text)
            fields = {"config_error": text}
            ok = False
        else:
            log.info("reconfigured to user_config %s", record.config_hash)
            self.applied_config_hash = record.config_hash
            fields = {"applied_config_hash": record.config_hash, "config_error": ""}
            ok = True
        if not self.draining:
            fields["state"] = ReplicaState.RUNNING
        self.store.update_replica(self.replica_id, **fields)
        self.store.notify(f"replica:{self.record.deployment}")
        return ok

    def watch_health(self, dispatcher: Dispatcher) -> None:
        """Call ``check_health()`` every period; after 3 failures in a row, ask to be replaced."""
        if not dispatcher.has("check_health"):
            return
        period = float(self.config.get("health_check_period_s") or 10)
        watch = HealthWatch(dispatcher, wait_s=period, timeout_s=float(self.config.get("health_check_timeout_s") or 30))

        def loop() -> None:
            while True:
                time.sleep(period)
                reason = watch.check()
                if reason is None:
                    continue
                try:
                    self.store.update_replica(self.replica_id, unhealthy=True, message=reason)
                    self.store.notify(f"replica:{self.record.deployment}")
                except redis.RedisError as error:
                    log.warning("cannot record that this replica is unhealthy (%s)", error)

        threading.Thread(target=loop, name="watch_health", daemon=True).start()

    def fail_start(self, error: BaseException) -> None:
        if isinstance(error, ReconfigureFailed) and error.__cause__ is not None:
            cause = error.__cause__
            text = RECONFIGURE_FAILED_MARK + "\n" + "".join(
                traceback.format_exception(type(cause), cause, cause.__traceback__))
        elif isinstance(error, (SignatureError, SecretNotConfigured)):
            text = str(error)       # refused, not a bug: one line says why
        else:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        log.error("the start of %s failed:\n%s", self.record.deployment, text)
        self.store.update_replica(self.replica_id, state=ReplicaState.FAILED, failure="start", message=text)

    def redeliveries(self, task_id: str) -> int:
        """How often ``task_id`` was put back after its replica died (0 if Redis cannot tell)."""
        try:
            return self.store.redeliveries(task_id)
        except redis.RedisError as error:
            log.warning("cannot read how often request %s was delivered (%s); serving it", task_id, error)
            return 0

    def started(self, dispatcher: Dispatcher) -> None:
        """Taking requests: check health, follow the user_config, and say RUNNING."""
        self.watch_health(dispatcher)
        self.follow_config(dispatcher)
        self.stats.start()
        self.store.update_replica(self.replica_id, state=ReplicaState.RUNNING, pid=os.getpid(), message="")
        self.store.notify(f"replica:{self.record.deployment}")
        log.info("replica %s serves %s", self.replica_id, replica_queue(self.record))

    def stopping(self) -> None:
        """Draining: taking no more requests, finishing those in hand."""
        self.draining = True
        self.store.update_replica(self.replica_id, state=ReplicaState.DRAINING)

    def serve(self, dispatcher: Dispatcher) -> int:
        """Serve the deployment's queue until drained: with a Celery worker, or a
        :class:`~taskserve.node.batcher.BatchServer` when the class has batched methods."""
        serializer = self.config.get("serializer", "json")
        concurrency = int(self.config.get("max_concurrent_queries") or 1)
        if serializer == "pickle" and hasattr(os, "getuid") and os.getuid() == 0:
            # Celery refuses pickle under root unless told; the deployment asked for it.
            os.environ.setdefault("C_FORCE_ROOT", "1")
            log.warning("serving pickled requests as root: anyone who can write to this Redis can run code here")
        app = make_app(self.address, serializer,
                       result_expires=float(self.config.get("result_ttl_s") or DEFAULT_RESULT_EXPIRES_S))
        app.conf.broker_transport = ReplicaTransport   # this worker's connections only
        inflight = InflightFile(self.inflight_path)
        self.in_flight = InFlightReport(self.store, self.replica_id, inflight, self.record.deployment,
                                        self.stats.wake)
        self.stats.also.append(self.in_flight.report)
        max_deliveries = int(self.config.get("max_deliveries") or DEFAULT_MAX_DELIVERIES)
        if batched_methods(dispatcher.target):
            from .batcher import BatchServer  # it imports this module; only batched deployments load it
            try:
                return BatchServer(self, dispatcher, app, inflight, max_deliveries, concurrency, serializer).serve()
            finally:
                self.stats.flush()

        taken: dict[str, Any] = {}     # task id -> its kombu message, from receipt to answer

        # The task stores its answer itself, with the acknowledgement (answer_and_acknowledge);
        # Celery stores only what escapes it (store_errors_even_if_ignored).
        @app.task(name=TASK_NAME, acks_late=True, bind=True, ignore_result=True, store_errors_even_if_ignored=True)
        def call(task: Any, method: str, args: list, kwargs: dict) -> None:
            task_id = task.request.id
            envelope: Optional[dict] = None
            # Only a message put back after a crash (or the visibility timeout) pays this read.
            if (task.request.delivery_info or {}).get("redelivered"):
                envelope = refuse_redelivery(self.redeliveries(task_id), max_deliveries)
                if envelope is not None:
                    log.error("request %s not run: %s", task_id, envelope["message"])
            if envelope is None:
                started = time.perf_counter()
                envelope = _envelope(dispatcher, method, args, kwargs)
                self.stats.count(time.perf_counter() - started, envelope["ok"])
            envelope["version"] = self.record.version    # the gateway's x-taskserve-version
            try:
                answer_and_acknowledge(app.backend, taken.pop(task_id), task_id, envelope)
            except REDIS_UNREACHABLE as error:
                # Unacknowledged, the request is served again once Redis is back: not lost.
                raise Reject(f"cannot store the answer ({_why(error)})", requeue=True) from None

        @signals.task_received.connect(weak=False)
        def on_received(request: Any = None, **_: Any) -> None:
            taken[request.id] = request.message
            inflight.add(request.id, request.message.delivery_tag)
            self.in_flight.took()

        @signals.task_postrun.connect(weak=False)
        def on_done(task_id: str = "", **_: Any) -> None:
            inflight.remove(task_id)

        @signals.task_revoked.connect(weak=False)
        def on_revoked(request: Any = None, **_: Any) -> None:
            # An HTTP request whose caller gave up (it expired in the queue): acknowledged, not run.
            if request is not None:
                taken.pop(request.id, None)
                inflight.remove(request.id)

        @signals.worker_ready.connect(weak=False)
        def on_ready(**_: Any) -> None:
            self.started(dispatcher)

        @signals.worker_shutting_down.connect(weak=False)
        def on_shutdown(**_: Any) -> None:
            self.stopping()

        # Celery logs every request and its result at INFO: costly per request, and
        # results may be private. Startup and errors still reach the log.
        for per_request in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(per_request).setLevel(logging.WARNING)
        worker = app.Worker(
            hostname=f"{self.replica_id}@{socket.gethostname()}",
            queues=[replica_queue(self.record)],
            pool="solo" if concurrency == 1 else "threads",
            concurrency=concurrency,
            loglevel="INFO",
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            optimization="fair",
            quiet=True,
            consumer_cls=ReplicaConsumer,
        )
        try:
            worker.start()
        finally:
            self.stats.flush()
        return worker.exitcode or 0


def _envelope(dispatcher: Dispatcher, method: str, args: list, kwargs: dict) -> dict:
    """The user's result, or their exception as data the caller re-raises."""
    try:
        return {"ok": True, "value": dispatcher(method, args, kwargs)}
    except Exception as error:  # the caller gets it as ReplicaError
        return {
            "ok": False,
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        }


def answer_and_acknowledge(backend: Any, message: Any, task_id: str, envelope: dict) -> None:
    """Store ``envelope`` as the answer to ``task_id`` and acknowledge its ``message``, in
    one transaction: one round trip, where Celery reads the previous result, stores the
    answer, then acknowledges (three). Retried while Redis is unreachable.

    What is stored and published is what ``backend.mark_as_done`` would (handles and the
    gateway read it as such); once written, the message's acknowledgement by Celery
    costs no round trip (:meth:`ReplicaQoS.ack`). Written together, the answer is
    never stored without the request being acknowledged, nor the other way round.
    """
    qos = message.channel.qos
    meta = backend._get_result_meta(result=envelope, state=states.SUCCESS, traceback=None, request=None)
    meta["task_id"] = task_id
    key, value = backend.get_key_for_task(task_id), backend.encode(meta)

    def write() -> None:
        with qos.channel.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
            if backend.expires:
                pipe.setex(key, backend.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)    # on the key's name, as Celery's backend publishes
            qos._remove_from_indices(message.delivery_tag, pipe)
            pipe.execute()

    retry_while_unreachable(write, "store an answer and acknowledge its request")
    qos.acknowledged_in_redis(message.delivery_tag)


def refuse_redelivery(deliveries: int, max_deliveries: int) -> Optional[dict]:
    """The answer to a request whose replica died ``deliveries`` times, if that is
    too many to run it again; None to run it.

    >>> refuse_redelivery(2, max_deliveries=3) is None
    True
    >>> refuse_redelivery(3, max_deliveries=3)["message"]
    'a replica died 3 times while serving this request; it is not delivered again (max_deliveries=3)'
    """
    if deliveries < max_deliveries:
        return None
    return {
        "ok": False,
        "type": "ReplicaCrashed",
        "message": (f"a replica died {deliveries} times while serving this request; "
                    f"it is not delivered again (max_deliveries={max_deliveries})"),
        "traceback": "",
    }


# --------------------------------------------------------------------------- what the queue holds


def _line(text: str, limit: int = 120) -> str:
    """``text`` on one line of at most ``limit`` characters, for a log line.

    >>> _line("Expecting value:\\n  line 1", limit=20)
    'Expecting value:...'
    """
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line of at most ``limit`` characters.

    >>> _short("x" * 100, limit=10)
    "'xxxxxx..."
    """
    return _line(repr(value), limit)


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {_line(str(error))}"


def request_problem(message: Any) -> Optional[str]:
    """Why the kombu ``message`` is not a taskserve request, or None if it is one.

    A taskserve request is a Celery (protocol 2) task named :data:`TASK_NAME` whose
    arguments are ``(method, args, kwargs)``. Its body is decoded here as Celery would
    (the message keeps it, so it is decoded once).

    >>> from kombu import Message
    >>> def task(name, body):
    ...     return Message(body=body, content_type="application/json", content_encoding="utf-8",
    ...                    headers={"task": name, "id": "d9b1"})
    >>> request_problem(task(TASK_NAME, '[["__call__", [1], {}], {}, {}]')) is None
    True
    >>> print(request_problem(task("billing.charge", '[[], {}, {}]')))
    a task named 'billing.charge', not taskserve.call
    >>> print(request_problem(task(TASK_NAME, '[["__call__", 1], {}, {}]')))
    its arguments are not (method, args, kwargs): ['__call__', 1]
    >>> print(request_problem(Message(body="hi", headers={})))
    not a Celery task (no task header)
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return "not a Celery task (no task header)"
    if headers["task"] != TASK_NAME:
        return f"a task named {_short(headers['task'])}, not {TASK_NAME}"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "a task without an id"
    try:
        body = message.decode()
    except Exception as error:
        return f"its body cannot be decoded ({_why(error)})"
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        return f"its body is not Celery's (args, kwargs, embed): {_short(body)}"
    args, task_kwargs, embed = body
    if not (isinstance(args, (list, tuple)) and len(args) == 3 and isinstance(args[0], str)
            and isinstance(args[1], (list, tuple)) and isinstance(args[2], dict)):
        return f"its arguments are not (method, args, kwargs): {_short(args)}"
    if task_kwargs or not isinstance(task_kwargs, dict):
        return f"it has keyword arguments: {_short(task_kwargs)}"
    if embed is not None and not isinstance(embed, dict):
        return f"its options are not a mapping: {_short(embed)}"
    return None


def retry_while_unreachable(action: Callable[[], T], what: str, budget_s: float = ACK_RETRY_S,
                            sleep: Callable[[float], None] = time.sleep) -> T:
    """``action()``, tried again with backoff while Redis is unreachable, for up to ``budget_s``.

    >>> attempts = []
    >>> def ack():
    ...     attempts.append(1)
    ...     if len(attempts) < 3:
    ...         raise redis.ConnectionError("Connection refused")
    ...     return "acknowledged"
    >>> retry_while_unreachable(ack, "acknowledge", sleep=lambda seconds: None), len(attempts)
    ('acknowledged', 3)
    """
    deadline = time.monotonic() + budget_s
    delay = 0.1
    failed = False
    while True:
        try:
            result = action()
        except REDIS_UNREACHABLE as error:
            if time.monotonic() + delay > deadline:
                raise
            if not failed:
                log.warning("cannot %s (%s); trying again for up to %gs", what, _why(error), budget_s)
                failed = True
            sleep(delay)
            delay = min(2 * delay, 2.0)
            continue
        if failed:
            log.info("could %s after all", what)
        return result


class NotAMessage(Exception):
    """An item of a queue that is not a kombu message envelope."""


class ReplicaMessage(virtual.Message):
    """kombu's message, raising :class:`NotAMessage` for anything that is not one."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        if not isinstance(payload, dict):
            raise NotAMessage(f"a JSON {type(payload).__name__}, not a message envelope: {_short(payload)}")
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as error:
            raise NotAMessage(f"not a message envelope ({_why(error)})") from None
        info = self.delivery_info
        # The Redis transport keeps these in its unacknowledged index.
        if not (isinstance(self.delivery_tag, str) and isinstance(info, dict)
                and "exchange" in info and "routing_key" in info):
            raise NotAMessage("not a message envelope (no delivery_tag or delivery_info)")


class ReplicaQoS(kombu_redis.QoS):
    """The Redis transport's acknowledgements, retried while Redis restarts.

    Otherwise a request served while Redis was away stays unacknowledged, and runs
    again after the visibility timeout. A message acknowledged in Redis together with
    its answer (:func:`answer_and_acknowledge`) is acknowledged here in memory only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settled: set[str] = set()

    def acknowledged_in_redis(self, delivery_tag: str) -> None:
        """``delivery_tag`` left the unacknowledged index with its answer: acknowledge it here
        now (a restore at shutdown must not put it back), and its ack by Celery costs nothing."""
        self.settled.add(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        # A message BRPOP took just as Redis went away is held nowhere but here until
        # it is in the unacknowledged hash: recorded once Redis is back, then served.
        retry_while_unreachable(lambda: super(ReplicaQoS, self).append(message, delivery_tag),
                                "record a request as taken")

    def ack(self, delivery_tag: str) -> None:
        if delivery_tag in self.settled:
            self.settled.discard(delivery_tag)
            return
        retry_while_unreachable(lambda: super(ReplicaQoS, self).ack(delivery_tag), "acknowledge a request")

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        retry_while_unreachable(lambda: super(ReplicaQoS, self).reject(delivery_tag, requeue=requeue),
                                "reject a request")


class ReplicaChannel(kombu_redis.Channel):
    """The Redis transport's channel, dropping queue items that are not messages.

    kombu would raise out of the worker's event loop on them: a ``JSONDecodeError``
    stops the worker, a ``KeyError`` counts as a lost connection.
    """

    Message = ReplicaMessage
    QoS = ReplicaQoS

    # (the BRPOP connection's socket, its CLIENT ID); the id is None where Redis refuses CLIENT.
    brpop_client: Optional[tuple[Any, Optional[int]]] = None
    # One client over the channel's pool, for every command that brings none.
    shared_client: Any = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """``client``, else one client kept for the channel's connection pool.

        kombu builds a new ``redis.Redis`` for each command batch (recording a request as
        taken, acknowledging it), which costs about 7% of a replica's CPU a request. A
        client over a pool holds no connection of its own, so one serves every batch and
        thread; a new one is made if the channel's pool is replaced.
        """
        if client is not None:
            yield client
            return
        shared = self.shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self.shared_client = self._create_client()
        yield shared

    def _brpop_start(self, timeout: Any = None) -> Any:
        self._remember_client_id()
        return super()._brpop_start(timeout)

    def _remember_client_id(self) -> None:
        """Note the BRPOP connection's client id (one round trip per new connection), so
        that :meth:`close` can end its wait at once."""
        connection = self.client.connection
        sock = getattr(connection, "_sock", None)
        if sock is None or (self.brpop_client is not None and self.brpop_client[0] is sock):
            return
        try:
            connection.send_command("CLIENT", "ID")
            self.brpop_client = (sock, int(connection.read_response()))
        except redis.ResponseError as error:     # CLIENT renamed or disabled (some hosted Redis)
            log.info("cannot read this consumer's Redis client id (%s): a drain waits out its BRPOP", error)
            self.brpop_client = (sock, None)

    def close(self) -> None:
        # kombu reads the reply of a BRPOP in flight before closing (it may hold a message
        # already popped); CLIENT UNBLOCK makes that reply come now, not at the timeout.
        sock = getattr(self.client.connection, "_sock", None) if self._in_poll else None
        if sock is not None and self.brpop_client is not None and self.brpop_client[0] is sock \
                and self.brpop_client[1] is not None:
            try:
                with self.Client(connection_pool=self.pool) as client:
                    client.execute_command("CLIENT", "UNBLOCK", self.brpop_client[1])
            except redis.RedisError as error:
                log.info("cannot end this consumer's BRPOP early (%s); waiting it out", error)
        super().close()

    def _brpop_read(self, **options: Any) -> Any:
        transport = self.connection
        transport.delivering = False
        try:
            return super()._brpop_read(**options)
        except Exception as error:
            # Past the JSON decoding, what is raised is not about this item.
            if transport.delivering or isinstance(error, (kombu_redis.Empty, redis.RedisError, *REDIS_UNREACHABLE)):
                raise
            log.error("dropped an item of %s: not JSON (%s)", ", ".join(self._active_queues) or "the queue",
                      _why(error))
            return True


class _ShownAsRedis(type):
    # kombu writes the transport into the URL it logs ("Connected to redis://...").
    def __str__(cls) -> str:
        return "redis"

    # ... and `celery inspect stats` sends it in its JSON reply ("broker": {"transport": ...}).
    def __json__(cls) -> str:
        return "redis"


class ReplicaTransport(kombu_redis.Transport, metaclass=_ShownAsRedis):
    """The Redis transport with :class:`ReplicaChannel`."""

    Channel = ReplicaChannel
    delivering = False
    brpop_timeout = BRPOP_TIMEOUT_S

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        # kombu checks every second whether bindings of expiring queues need a refresh;
        # a replica's queue never expires, so that check is a wake-up a second for nothing.
        cycle = self.cycle
        binding_check = getattr(cycle, "_binding_expiry_tref", None)
        if binding_check is not None:
            binding_check.cancel()
            cycle._binding_expiry_tref = loop.call_repeatedly(IDLE_WAKE_S, cycle.maybe_refresh_binding_expiry)

    def _deliver(self, message: Any, queue: str) -> None:
        self.delivering = True
        try:
            super()._deliver(message, queue)
        except NotAMessage as error:
            log.error("dropped an item of %s: %s", queue, error)


# The signals that stop a Celery worker; each must wake a sleeping hub (quiet_hub).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def quiet_hub(hub: Any, idle_s: float = IDLE_WAKE_S) -> bool:
    """Let kombu's ``hub`` sleep up to ``idle_s`` between wake-ups while nothing happens.

    kombu's loop polls until its next timer entry, but for at most its timer's
    ``max_interval`` (2 s), and for 1 s when it has no entry; the Redis transport's
    entries come every 10 s or less (:class:`ReplicaTransport` makes its every-second one
    come every ``IDLE_WAKE_S``). Returns False, and changes nothing, on a kombu whose
    hub has no waker that a signal handler could use (see :func:`wake_on_signal`).

    >>> from kombu.asynchronous import Hub
    >>> hub = Hub()
    >>> quiet_hub(hub, 10.0), hub.timer.max_interval
    (True, 10.0)
    >>> entry = hub.call_repeatedly(10.0, print)
    >>> 9.0 < hub.fire_timers() <= 10.0
    True
    """
    if not hasattr(hub, "_create_waker") or not hasattr(hub.timer, "max_interval"):
        return False
    hub.timer.max_interval = idle_s
    hub.__dict__.pop("scheduler", None)   # a cached iterator that read the old interval
    return True


def wake_on_signal(signum: int, hub: Any) -> None:
    """Make ``signum``'s handler (Celery's, which sets a flag the loop reads between
    polls) also wake ``hub``'s poll, so a stop is not noticed only ``IDLE_WAKE_S`` later."""
    previous = signal.getsignal(signum)
    if not callable(previous):
        return   # default or ignored: nothing waits for the loop to notice it

    def handler(number: int, frame: Any) -> None:
        wake = getattr(getattr(hub, "_waker", None), "wake", None)
        if wake is not None:
            with contextlib.suppress(Exception):   # never in the way of Celery's own handler
                wake()   # one non-blocking send on a socket pair: safe in a signal handler
        previous(number, frame)

    signal.signal(signum, handler)


class ReplicaConsumer(Consumer):
    """Celery's consumer, serving only taskserve requests.

    Anything else on the queue is rejected (acknowledged and dropped) with one log
    line saying why, where Celery would log a traceback, or raise out of the worker.
    """

    def ensure_connected(self, conn: Any) -> Any:
        ensure_connection = conn.ensure_connection
        conn.ensure_connection = lambda *args, **kwargs: ensure_connection(*args, **{**RECONNECT_INTERVALS_S, **kwargs})
        return super().ensure_connected(conn)

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        self.quiet = quiet_hub(hub)

    def on_ready(self) -> None:
        super().on_ready()
        # Celery's stop handlers are in place now; they only set a flag the loop looks at.
        if getattr(self, "quiet", False):
            for signum in STOP_SIGNALS:
                wake_on_signal(signum, self.hub)

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], Any]:
        serve = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            problem = request_problem(message)
            if problem is not None:
                return self.drop(message, problem)
            # The task stores its answer itself. A sender's explicit ignore_result=False
            # (Celery's default header) would make Celery store the result too, after
            # first reading the answer back: a round trip a request for nothing.
            message.headers.pop("ignore_result", None)
            return serve(message)

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.drop(message, "not a Celery task")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.drop(message, f"a task of an unknown name ({_why(exc)})")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.drop(message, f"an invalid task ({_why(exc)})")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self.drop(message, f"its body cannot be decoded ({_why(exc)})")

    def drop(self, message: Any, why: str) -> None:
        queues = [queue.name for queue in getattr(self.task_consumer, "queues", None) or ()]
        log.error("dropped a message of %s: %s", ", ".join(queues) or "the queue", why)
        message.reject_log_error(log, self.connection_errors)


def main(argv: list[str] | None = None) -> int:
    """Run replica ``--replica-id`` on the cluster at ``$TASKSERVE_ADDRESS``.

    ``--address`` is still accepted, but a node agent passes the address in the
    environment: a command line can be read by every user of the machine.
    """
    parser = argparse.ArgumentParser(prog="python -m taskserve.node.replica")
    parser.add_argument("--address", default=os.environ.get(ADDRESS_ENV),
                        help=f"Redis URL of the cluster (default: ${ADDRESS_ENV})")
    parser.add_argument("--replica-id", required=True)
    args = parser.parse_args(argv)
    if not args.address:
        parser.error(f"no cluster address: set ${ADDRESS_ENV} (as the node agent does) or pass --address")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    if os.environ.get(INFLIGHT_FILE_ENV):
        # Held until this process is gone: how a restarted agent knows it still runs.
        _lock_fd = hold_lock(os.environ[INFLIGHT_FILE_ENV])  # noqa: F841

    store = make_store(args.address)
    replica = ReplicaProcess(store, args.address, args.replica_id)
    store.update_replica(args.replica_id, pid=os.getpid())
    # A drain requested while the constructor runs ends the process once it returns.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        dispatcher = replica.load()
    except SystemExit:
        return 0
    except BaseException as error:
        replica.fail_start(error)
        return EXIT_CONSTRUCTOR_FAILED
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return replica.serve(dispatcher)


if __name__ == "__main__":
    sys.exit(main())
