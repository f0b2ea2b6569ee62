"""The replica's transport: kombu's Redis channel and Celery's consumer, made to ride out faults.

What it changes of kombu's and Celery's, and why:

* :class:`ReplicaChannel` drops queue items that are not messages (kombu would raise
  out of the worker's loop on them), keeps one Redis client per connection pool for the
  commands that bring none, and ends a BRPOP in flight at once on close (``CLIENT
  UNBLOCK``), so a drain does not wait out its timeout;
* :class:`ReplicaQoS` retries recording a request as taken, and its acknowledgement,
  while Redis restarts, and lets an answer's transaction acknowledge a message in Redis
  (:meth:`ReplicaQoS.acknowledged_in_redis`); it never hands a request to another
  consumer after a visibility timeout (a job may run for hours: a dead replica's
  requests are put back by its agent, or by the controller when its node died);
* :class:`ReplicaTransport` lets an idle worker's event loop sleep (kombu's binding
  check every ``IDLE_WAKE_S``, not every second), and :func:`quiet_hub` /
  :func:`wake_on_signal` make the hub sleep until something happens;
* :class:`ReplicaConsumer` reconnects at most a second apart and hands every message to
  the server's handler (:meth:`ReplicaConsumer.create_task_handler` is given one).

The private kombu and Celery names these subclasses rely on are listed in
docs/architecture.md and checked by ``tests/test_dependencies.py``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

import redis
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps as kombu_dumps

from ..store.keys import CONSUME_ORDER, queue_list, result_key
from ..wire import STARTED_RECORD, NotARequest, _short, _why

log = logging.getLogger("taskserve.node.transport")

T = TypeVar("T")

# How long an acknowledgement keeps retrying while Redis is unreachable (say, restarting).
ACK_RETRY_S = 30.0

# The consumer's reconnection attempts after Redis went away: 0.1 s, then 0.2 s more each
# time, at most 1 s apart (Celery's own: 2, 4, 6 ... 30 s, so a replica resumed serving
# up to 12 s after a restarted Redis was back).
RECONNECT_INTERVALS_S = {"interval_start": 0.1, "interval_step": 0.2, "interval_max": 1.0}

# What a Redis that is down or restarting raises (BusyLoadingError is a ConnectionError).
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

# How long the consumer's BRPOP on an empty queue blocks before it is sent again (kombu's
# default: 1 s, a wake-up a second per idle replica). A drain does not wait it out:
# closing the channel ends it (ReplicaChannel.close). A message pushed meanwhile wakes it at once.
BRPOP_TIMEOUT_S = 10

# How long the worker's event loop (kombu's hub) sleeps while nothing happens (kombu's
# own: 1 s, one wake-up a second per idle replica). Whatever has work for it wakes it
# at once: its sockets, a call from another thread, and a stop signal (quiet_hub).
IDLE_WAKE_S = 10.0


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


class ReplicaMessage(virtual.Message):
    """kombu's message, raising :class:`~taskserve.wire.NotARequest` for anything that is not one."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        if not isinstance(payload, dict):
            raise NotARequest(f"a JSON {type(payload).__name__}, not a message envelope: {_short(payload)}")
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as error:
            raise NotARequest(f"not a message envelope ({_why(error)})") from None
        info = self.delivery_info
        # The Redis transport keeps these in its unacknowledged index.
        if not (isinstance(self.delivery_tag, str) and isinstance(info, dict)
                and "exchange" in info and "routing_key" in info):
            raise NotARequest("not a message envelope (no delivery_tag or delivery_info)")


class ReplicaQoS(kombu_redis.QoS):
    """The Redis transport's acknowledgements, retried while Redis restarts.

    Otherwise a request served while Redis was away stays unacknowledged, and runs
    again after the visibility timeout. A message acknowledged in Redis together with
    its answer (:class:`taskserve.node.answering.Answerer`) is acknowledged here in
    memory only (:meth:`acknowledged_in_redis`).
    """

    # The set of the tags this replica holds (taskserve:held:<replica id>), kept with kombu's
    # unacknowledged hash, so that the controller puts back what a replica on a dead node
    # held: set by the replica process before it serves.
    held_key: Optional[str] = None

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Never: kombu hands out a message unacknowledged for its visibility timeout again,
        while its replica may still run it (a job may run for hours). A dead replica's
        messages are put back by its agent, and a dead node's by the controller."""

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            pipe = super()._remove_from_indices(delivery_tag, pipe)
            if self.held_key:
                pipe.srem(self.held_key, delivery_tag)
            return pipe

    def acknowledged_in_redis(self, delivery_tag: str) -> None:
        """``delivery_tag`` left the unacknowledged index with its answer: acknowledge it in
        memory (a restore at shutdown must not put it back; the prefetch has room again)."""
        virtual.QoS.ack(self, delivery_tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        # A message BRPOP took just as Redis went away is held nowhere but here until
        # it is in the unacknowledged hash: recorded once Redis is back, then served.
        retry_while_unreachable(lambda: self.record_taken(message, delivery_tag), "record a request as taken")
        virtual.QoS.append(self, message, delivery_tag)

    # How long the mark that a request was taken lasts (the deployment's result_ttl_s).
    taken_mark_ttl_s: int = 600

    def record_taken(self, message: Any, delivery_tag: str, also: Optional[Callable[[Any], None]] = None) -> list:
        """What kombu's Redis QoS records of a message taken (its unacknowledged index and
        hash), with its tag in this replica's held set, in one round trip; ``also`` may add
        commands to that pipeline. The pipeline's replies.

        The same round trip marks the request taken: Celery's ``STARTED`` in its result key,
        set only if the key holds nothing yet. A request whose key holds something already
        (it runs elsewhere, or ran: its id was pushed twice) is marked ``message.duplicate``,
        for the server to answer it from its first run instead of running it again.
        """
        delivery = message.delivery_info
        task_id = message.headers.get("id") if isinstance(message.headers, dict) else None
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag,
                      kombu_dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            if self.held_key:
                pipe.sadd(self.held_key, delivery_tag)
            if isinstance(task_id, str) and task_id:
                pipe.set(result_key(task_id), STARTED_RECORD, nx=True, ex=self.taken_mark_ttl_s)
            if also is not None:
                also(pipe)
            replies = pipe.execute()
        if isinstance(task_id, str) and task_id:
            message.duplicate = replies[3 if self.held_key else 2] is None
        return replies

    def ack(self, delivery_tag: str) -> None:
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
        """kombu's BRPOP of the active queues, taking each queue's lists in
        :data:`~taskserve.store.keys.CONSUME_ORDER` (a higher taskserve priority first),
        where kombu takes them in the order of its priority steps."""
        self._remember_client_id()
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [queue_list(queue, priority) for priority in CONSUME_ORDER for queue in queues] + [timeout or 0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        command_args = ["BRPOP", *keys]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)

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
        except NotARequest as error:
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
    """Celery's consumer, reconnecting fast, sleeping while idle and waking on a stop.

    Anything on the queue that Celery itself cannot read is rejected (acknowledged and
    dropped) with one log line saying why, where Celery would log a traceback, or raise
    out of the worker. A server subclasses it to receive the messages
    (:class:`taskserve.node.celery_server.ServerConsumer`).
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


