"""Calling a deployment from Python: handles and responses.

Example::

    handle = taskserve.get_deployment("echo").get_handle()
    handle.remote("hi").result(timeout=10)      # 'hi'
    handle.pid.remote().result()                # 41237, the replica's process id

What a call costs in Redis: the push of its message and, once :meth:`Response.result`
read the answer, one ``DEL`` of the answer (an answer nobody reads expires after the
deployment's ``result_ttl_s``). The answer arrives on the one pub/sub subscription this
process makes (:mod:`taskserve.answers`), so a call subscribes to nothing of its own. A handle re-reads its deployment's goal and health (one
``MGET``) at most once a second, and a deployment with ``max_queued_requests`` costs
one ``LLEN`` per call.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Optional

import kombu.exceptions
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from .answers import AnswerListener, Waiter
from .celery_app import make_app
from .connection import async_connection_pool, cluster_secret, current_address, current_store, redis_client
from .errors import (
    BackPressureError,
    CallOutcomeUnknown,
    DeploymentNotFound,
    DeploymentUnavailable,
    RedisUnavailable,
    SecretNotConfigured,
    SignatureError,
)
from .jobs import Job
from .signing import ClusterSecret, check_goal
from .state import DeploymentHealth, DeploymentState, Goal, Replica, ReplicaState
from .store import Store, canary_queue_name, queue_list, queue_name, result_key
from .store.jobs import CANCEL_FLAG_TTL_S
from .store.keys import cancel_key, stream_key
from .wire import (
    DEFAULT_RETRY_DELAY_S,
    READY_STATES,
    Answer,
    Call,
    CallEncoder,
    check_priority,
    decode_answer,
    job_fields,
    new_job_id,
    priority_to_transport,
    read_stream_entry,
)

# A handle re-reads its deployment (exists? can serve? queue limit?) at most this often.
EXISTENCE_CHECK_INTERVAL_S = 1.0

# A caller meets a Redis that does not answer with one immediate retry (a pooled
# connection may be stale after a Redis restart), then the error, which it sees as
# RedisUnavailable. Replicas retry their result writes for half a minute; a caller
# waiting that long would only hide the outage.
REDIS_CONNECT_TIMEOUT_S = 5.0
# A Redis that hangs fails a call after this long instead of blocking it forever.
REDIS_SOCKET_TIMEOUT_S = 30.0
# A caller waiting for an answer reads it again this often after Redis went away, for up
# to its timeout (OUTAGE_WAIT_S when it gave none).
OUTAGE_RETRY_S = 0.2
OUTAGE_WAIT_S = 60.0
# A push that did not land (checked, after its reply was lost) is sent again up to this many times in all.
PUSH_ATTEMPTS = 2
# A caller still waiting reads its answer's key this often, in case its publication was missed.
RESULT_RECHECK_S = 1.0
# The one thread of the process that deletes answers read by asyncio callers (and reads
# a key whose publication was missed): an awaited call ties up no thread of its own.
_BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="taskserve-answers-io")

# A stream's reader blocks this long for its next entries, and takes this many at once.
STREAM_BLOCK_MS = 1000
STREAM_READ_COUNT = 1000

# Replicas that take requests from the queue, or may soon (a constructor still running).
SERVING_STATES = frozenset({ReplicaState.STARTING, ReplicaState.RUNNING, ReplicaState.RECONFIGURING})

# What the Redis clients of Celery, kombu and redis-py raise when Redis is away.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError, OSError)


@dataclass(frozen=True)
class Caller:
    """What this process calls with, per address and serializer: a Redis client that
    retries once (a pooled connection may be stale after a Redis restart), then lets
    the caller see :class:`RedisUnavailable`; the message template; the answer listener."""

    address: str
    client: redis.Redis
    writer: redis.Redis                 # the same, without retries: a push is never sent twice
    messages: CallEncoder
    listener: AnswerListener
    serializer: str
    secret: Optional[ClusterSecret]     # pickle only: calls are signed, answers verified

    def encode(self, call: Call) -> bytes:
        return self.messages.encode(call, self.serializer, self.secret)

    def decode(self, data: bytes) -> Answer:
        return decode_answer(data, self.serializer, self.secret)


def caller(address: str, serializer: str) -> Caller:
    """The :class:`Caller` of this process for ``address`` and ``serializer`` (a forked
    child gets its own: a connection and a listener thread do not survive a fork)."""
    pid = os.getpid()
    return Caller(address, _client(address, pid), _writer(address, pid), _messages(address), _listener(address, pid),
                  serializer, cluster_secret(address) if serializer == "pickle" else None)


@functools.lru_cache(maxsize=None)
def _client(address: str, pid: int) -> redis.Redis:
    return redis_client(address, retry=Retry(NoBackoff(), 1), socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_keepalive=True)


@functools.lru_cache(maxsize=None)
def _writer(address: str, pid: int) -> redis.Redis:
    return redis_client(address, retry=Retry(NoBackoff(), 0), socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_keepalive=True)


@functools.lru_cache(maxsize=None)
def _messages(address: str) -> CallEncoder:
    return CallEncoder(make_app(address))


@functools.lru_cache(maxsize=None)
def _listener(address: str, pid: int) -> AnswerListener:
    return AnswerListener(_client(address, pid))


def unavailable_reason(goal: Goal, health: DeploymentHealth,
                       replicas: Callable[[], Iterable[Replica]]) -> Optional[str]:
    """Why no call to ``goal``'s deployment can be served, or None if one can (or soon may).

    Only a deployment the controller found UNHEALTHY at its current goal, with no
    replica running or starting, is unavailable: its rollout failed and nothing will
    take its requests until a new deploy. One that is UPDATING, or scaled to zero, keeps
    its requests in the queue. ``replicas`` is read only when the health says UNHEALTHY.

    >>> goal = Goal(name="m", generation=2, version="1", spec_hash="s", num_replicas=1, options={},
    ...             code_sha="c", init_sha="i")
    >>> failed = DeploymentHealth(DeploymentState.UNHEALTHY, "constructor failed 3 times: ValueError: no",
    ...                           observed_generation=2)
    >>> unavailable_reason(goal, failed, list)
    'constructor failed 3 times: ValueError: no'
    >>> old = Replica("m-1", "m", "s0", "0", node_id="a", state=ReplicaState.RUNNING)
    >>> unavailable_reason(goal, failed, lambda: [old]) is None      # the previous version serves on
    True
    >>> unavailable_reason(goal, DeploymentHealth(DeploymentState.UPDATING, observed_generation=2), list) is None
    True
    """
    if (health.status != DeploymentState.UNHEALTHY or health.observed_generation != goal.generation
            or goal.num_replicas == 0):
        return None
    if any(r.state in SERVING_STATES and r.desired == "run" for r in replicas()):
        return None
    return health.message or "its rollout failed"


def check_callable_goal(goal: Goal, serializer: str) -> Goal:
    """``goal`` if this process may call it with ``serializer``: its signature checks out
    with the cluster secret. A process without the secret (a caller that deploys nothing)
    may make JSON calls on the goal as it reads it, never pickled ones: nothing it reads
    is unpickled, and its calls carry plain data. :class:`SignatureError` otherwise.
    """
    try:
        secret = cluster_secret()
    except SecretNotConfigured:
        if serializer == "json" and goal.options.get("serializer", "json") == "json":
            return goal
        raise SignatureError(f"deployment {goal.name!r} uses serializer='pickle', and this process has no cluster "
                             "secret to check its goal and sign its calls: set TASKSERVE_SECRET") from None
    try:
        return check_goal(goal, secret)
    except SignatureError as error:
        raise SignatureError(f"deployment {goal.name!r}: {error}; refused to call it") from None


def _refused(error: BaseException) -> bool:
    """Whether ``error`` is a connection Redis refused: nothing of the command was sent."""
    return isinstance(error.__context__ or error.__cause__, ConnectionRefusedError) \
        or "connection refused" in str(error).lower()


def _unreachable(error: BaseException) -> Optional[BaseException]:
    """The connection error behind ``error`` if it means Redis cannot be reached, else None."""
    if isinstance(error, RuntimeError) and isinstance(error.__cause__, _UNREACHABLE):
        return error.__cause__    # a client that gave up reconnecting
    if isinstance(error, _UNREACHABLE):
        return error
    return None


class Response:
    """A request in flight; :meth:`result` waits for its value."""

    def __init__(self, caller: Caller, waiter: Waiter, task_id: str, deployment: str) -> None:
        self._caller = caller
        self._waiter = waiter
        self._task_id = task_id
        self.deployment = deployment
        self._answer: Optional[Answer] = None

    @property
    def request_id(self) -> str:
        return self._task_id

    def result(self, timeout: Optional[float] = None) -> Any:
        """The value the replica returned.

        Raises :class:`ReplicaError` if the replica's code raised, ``TimeoutError`` if
        no answer came within ``timeout`` seconds and :class:`RedisUnavailable` if Redis
        cannot be reached. The answer is removed from Redis once read; asking again
        gives the same value.
        """
        if self._answer is None:
            self._answer = self._await(timeout)
            self._forget()
        return self._answer.result()

    def _await(self, timeout: Optional[float]) -> Answer:
        """The answer's result record: as it is published, or read from its key.

        The key is read every ``RESULT_RECHECK_S`` while no answer is heard (one
        published while the listener's connection was re-established is only there),
        and at once when the listener lost its connection. While Redis cannot be
        reached, it is read every ``OUTAGE_RETRY_S``: a call already sent waits the
        outage out (replicas retry storing their answer) until its timeout
        (``OUTAGE_WAIT_S`` of outage without one), then raises :class:`RedisUnavailable`.
        """
        waiter, client = self._waiter, self._caller.client
        deadline = None if timeout is None else time.monotonic() + timeout
        outage_since: Optional[float] = None
        cause: Optional[BaseException] = None
        while True:
            pause = RESULT_RECHECK_S if outage_since is None else OUTAGE_RETRY_S
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
            if waiter.event.wait(max(pause, 0.0)):
                waiter.event.clear()
                data, waiter.data = waiter.data, None
                if data is not None:
                    answer = self._caller.decode(data)
                    if answer.state in READY_STATES:
                        return answer
                    continue
            try:
                data = client.get(waiter.key)
                outage_since = None
            except _UNREACHABLE as error:
                data, cause = None, error
                outage_since = outage_since or time.monotonic()
            if data is not None:
                answer = self._caller.decode(data)
                if answer.state in READY_STATES:
                    return answer
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if outage_since is not None:
                    raise RedisUnavailable(self._caller.address, str(cause).strip())
                raise self._timed_out(timeout)
            if deadline is None and outage_since is not None and now - outage_since >= OUTAGE_WAIT_S:
                raise RedisUnavailable(self._caller.address, str(cause).strip())

    def __await__(self) -> Any:
        """``await response``: the value, waited for in asyncio without tying up a thread
        (inside an ``async def`` method, to call another deployment)."""
        return self.result_async().__await__()

    async def result_async(self, timeout: Optional[float] = None) -> Any:
        """:meth:`result` for asyncio code: the answer arrives through the same listener,
        and the event loop is woken for it."""
        if self._answer is None:
            loop = asyncio.get_running_loop()
            woken = asyncio.Event()
            waiter = self._waiter
            waiter.wakeup = lambda: loop.call_soon_threadsafe(woken.set)
            deadline = None if timeout is None else loop.time() + timeout
            try:
                while self._answer is None:
                    if waiter.event.is_set():
                        waiter.event.clear()
                        data, waiter.data = waiter.data, None
                        answer = self._caller.decode(data) if data is not None else await self._read_key_async()
                        if answer is not None and answer.state in READY_STATES:
                            self._answer = answer
                            break
                    pause = RESULT_RECHECK_S if deadline is None else min(RESULT_RECHECK_S, deadline - loop.time())
                    if pause <= 0:
                        raise self._timed_out(timeout)
                    woken.clear()
                    try:
                        await asyncio.wait_for(woken.wait(), pause)
                    except asyncio.TimeoutError:
                        waiter.event.set()       # read the key, in case a publication was missed
            finally:
                waiter.wakeup = None
            _BACKGROUND.submit(self._forget)        # nobody waits on it
        return self._answer.result()

    async def _read_key_async(self) -> Optional[Answer]:
        try:
            data = await asyncio.get_running_loop().run_in_executor(_BACKGROUND, self._caller.client.get,
                                                                     self._waiter.key)
        except _UNREACHABLE as error:
            raise RedisUnavailable(self._caller.address, str(error).strip()) from None
        return self._caller.decode(data) if data is not None else None

    def _timed_out(self, timeout: Optional[float]) -> TimeoutError:
        return TimeoutError(
            f"no answer from deployment {self.deployment!r} within {timeout}s "
            f"(request {self.request_id}); `taskserve status {self.deployment}` shows its replicas"
        )

    def _forget(self) -> None:
        """Delete the answer from Redis: read, it is of no more use."""
        try:
            self._caller.client.delete(self._waiter.key)
        except _UNREACHABLE:
            pass    # Redis went away after answering; the answer expires on its own

    def __repr__(self) -> str:
        return f"<Response {self.deployment} {self.request_id}>"


class StreamResponse:
    """A streaming call in flight: iterate it (``for``, or ``async for``) for its chunks as
    the replica yields them.

    The iteration ends after the last chunk; an exception the generator raised comes
    after the chunks before it, as :class:`ReplicaError`, and so does a replica that died
    mid-stream ("stream interrupted"; a stream is not run again). Leaving the loop early
    (``break``, an exception, :meth:`cancel`) stops the generator in the replica.
    ``timeout`` bounds the wait for each next chunk (``TimeoutError``).

    Example::

        for token in handle.options(stream=True).generate.remote("hi"):
            print(token, end="")
    """

    def __init__(self, caller: Caller, task_id: str, deployment: str, timeout: Optional[float] = None) -> None:
        self._caller = caller
        self.request_id = task_id
        self.deployment = deployment
        self.timeout = timeout
        self._key = stream_key(task_id)
        self._ended = False

    def __iter__(self) -> Iterator[Any]:
        client, last = self._caller.client, "0-0"
        try:
            while True:
                waited_since = time.monotonic()
                while True:
                    try:
                        reply = client.xread({self._key: last}, count=STREAM_READ_COUNT, block=STREAM_BLOCK_MS)
                    except _UNREACHABLE as error:
                        raise RedisUnavailable(self._caller.address, str(error).strip()) from None
                    if reply:
                        break
                    self._check_wait(waited_since)
                for entry_id, fields in reply[0][1]:
                    last = entry_id
                    chunks, end = read_stream_entry(fields)
                    yield from chunks
                    if end is not None:
                        self._ended = True
                        end.result()
                        return
        finally:
            if not self._ended:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Any]:
        # A pool of this event loop's own (asyncio connections belong to one loop).
        client = redis.asyncio.Redis(connection_pool=async_connection_pool(
            self._caller.address, max_connections=2, timeout=REDIS_SOCKET_TIMEOUT_S))
        last = "0-0"
        try:
            while True:
                waited_since = time.monotonic()
                while True:
                    try:
                        reply = await client.xread({self._key: last}, count=STREAM_READ_COUNT, block=STREAM_BLOCK_MS)
                    except _UNREACHABLE as error:
                        raise RedisUnavailable(self._caller.address, str(error).strip()) from None
                    if reply:
                        break
                    self._check_wait(waited_since)
                for entry_id, fields in reply[0][1]:
                    last = entry_id
                    chunks, end = read_stream_entry(fields)
                    for chunk in chunks:
                        yield chunk
                    if end is not None:
                        self._ended = True
                        end.result()
                        return
        finally:
            if not self._ended:
                await asyncio.to_thread(self.cancel)
            await client.aclose(close_connection_pool=True)

    def _check_wait(self, since: float) -> None:
        if self.timeout is not None and time.monotonic() - since >= self.timeout:
            raise TimeoutError(f"no chunk from deployment {self.deployment!r} within {self.timeout}s "
                               f"(stream {self.request_id})")

    def cancel(self) -> None:
        """Stop the generator in the replica (the caller is leaving)."""
        self._ended = True
        try:
            self._caller.client.set(cancel_key(self.request_id), "1", ex=CANCEL_FLAG_TTL_S)
        except _UNREACHABLE:
            pass     # Redis is away: the stream ends when its generator does

    def result(self, timeout: Optional[float] = None) -> list:
        """Every chunk, once the stream ended (a list)."""
        self.timeout = timeout if timeout is not None else self.timeout
        return list(self)

    def __repr__(self) -> str:
        return f"<StreamResponse {self.deployment} {self.request_id}>"


@dataclass
class _Checked:
    """What a handle last read of its deployment; shared with its method handles."""

    at: float = float("-inf")
    max_queued: Optional[int] = None
    unavailable: Optional[str] = None
    version: str = ""                   # the stable version
    canary_version: str = ""            # the canary's, "" without one
    canary_percent: float = 0.0         # the share of the requests it gets


@dataclass(frozen=True)
class CallOptions:
    """How a handle's calls travel (:meth:`DeploymentHandle.options`).

    >>> CallOptions().with_changes(priority=8, max_retries=2).priority
    8
    >>> CallOptions().with_changes(priority=10)
    Traceback (most recent call last):
    ...
    ValueError: priority=10 is out of range: use a whole number from 0 (last) to 9 (first); the default is 5
    """

    method: str = "__call__"
    version: Optional[str] = None           # pinned: every call goes to this version's replicas
    priority: Optional[int] = None          # 0..9, a higher one first; None: the default, 5
    max_retries: int = 0                    # jobs: attempts that may fail and be retried
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S
    idempotency_key: Optional[str] = None   # jobs: the same key gives the same job
    stream: bool = False                    # a generator's chunks as they come

    def with_changes(self, **changes: Any) -> "CallOptions":
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown handle option {sorted(unknown)[0]!r}; the options are "
                            f"{', '.join(self.__dataclass_fields__)}")
        options = replace(self, **changes)
        if not isinstance(options.method, str) or not options.method or options.method.startswith("_") \
                and options.method != "__call__":
            raise ValueError(f"method={options.method!r}: name a public method, or '__call__'")
        if options.priority is not None:
            check_priority(options.priority)
        if isinstance(options.max_retries, bool) or not isinstance(options.max_retries, int) \
                or not 0 <= options.max_retries <= MAX_RETRIES:
            raise ValueError(f"max_retries={options.max_retries!r}: use a whole number from 0 to {MAX_RETRIES}")
        if isinstance(options.retry_delay_s, bool) or not isinstance(options.retry_delay_s, (int, float)) \
                or not 0 <= options.retry_delay_s <= MAX_RETRY_DELAY_S:
            raise ValueError(f"retry_delay_s={options.retry_delay_s!r}: use a number of seconds from 0 to "
                             f"{MAX_RETRY_DELAY_S}")
        key = options.idempotency_key
        if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY):
            raise ValueError(f"idempotency_key={key!r}: use a non-empty string of at most {MAX_IDEMPOTENCY_KEY} "
                             "characters")
        return options


MAX_RETRIES = 100
MAX_RETRY_DELAY_S = 86_400
# submit_many records at most this many jobs in one script call (one pipeline holds them
# all): Redis serves other clients between the calls.
SUBMIT_CHUNK = 1000
MAX_IDEMPOTENCY_KEY = 256


class DeploymentHandle:
    """Sends requests to a deployment's queue.

    ``handle.remote(...)`` calls ``__call__``; ``handle.method.remote(...)`` calls
    another public method, and ``handle.submit(...)`` (or ``handle.method.submit``)
    queues it as a job (:class:`taskserve.jobs.Job`). Handles are cheap and safe to share
    between threads.

    Only ``remote``, ``submit``, ``submit_many`` and ``options`` are the handle's own
    names: every other attribute is a method of the deployment, and
    ``handle.options(method="remote")`` reaches even a method named like those.

    A call fails at once, without queueing, with :class:`DeploymentNotFound` once the
    deployment is deleted, :class:`DeploymentUnavailable` while its rollout failed with
    no replica left to serve, :class:`BackPressureError` while its queue holds
    ``max_queued_requests`` requests and :class:`RedisUnavailable` while Redis is
    away. The first three are read at most once a second, so each takes up to a second
    to show. The queue limit is read with one ``LLEN`` before each push: callers racing
    each other can put a few requests over it (a job's submit checks it atomically).
    """

    def __init__(self, deployment: str, serializer: str = "json", method: str = "__call__",
                 version: Optional[str] = None) -> None:
        self._deployment = deployment
        self._serializer = serializer
        self._options = CallOptions(method=method, version=version)
        self._checked = _Checked()

    def _with(self, options: CallOptions) -> "DeploymentHandle":
        handle = DeploymentHandle(self._deployment, self._serializer)
        handle._options = options
        handle._checked = self._checked
        return handle

    def options(self, **changes: Any) -> "DeploymentHandle":
        """A handle whose calls travel with ``changes``:

        - ``version``: all go to that version (the stable one or the canary's), whatever
          the split: to try a canary by hand; None follows the split;
        - ``priority``: 0..9, a higher one taken first among the waiting calls and jobs
          (default 5);
        - ``max_retries``, ``retry_delay_s``, ``idempotency_key``: for jobs (:meth:`submit`);
        - ``method``: the method called, by name (for one named like a handle's own).

        Example::

            handle.options(version="2").remote("hi").result()    # answered by version 2
            handle.options(priority=9, max_retries=3).submit(video)
        """
        return self._with(self._options.with_changes(**changes))

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Enqueue a call and return at once with its :class:`Response` (a
        :class:`StreamResponse` with ``options(stream=True)``)."""
        store = current_store()
        address = current_address()
        options = self._options
        try:
            self._check(store)
            if self._checked.max_queued is not None:
                self._check_queue(store, self._checked.max_queued)
            queue = self._queue()
            call = caller(address, self._serializer)
            task_id = call.listener.new_task_id()
            item = self._encode(call, Call(task_id, options.method, list(args), kwargs, queue=queue,
                                           priority=options.priority, stream=options.stream))
            waiter = None if options.stream else call.listener.expect(task_id)   # listening before it can answer
        except Exception as error:
            cause = _unreachable(error)
            if cause is None:
                raise
            raise RedisUnavailable(address, str(cause).strip()) from None
        self._push(call, queue_list(queue, priority_to_transport(options.priority)), item, task_id,
                   waiter if not options.stream else None)
        if options.stream:
            return StreamResponse(call, task_id, self._deployment)
        assert waiter is not None
        return Response(call, waiter, task_id, self._deployment)

    def _push(self, call: Caller, list_key: str, item: bytes, task_id: str, waiter: Optional[Waiter]) -> None:
        """Push a call's message. A push whose reply was lost is never sent again blindly (it
        may have landed, and would run twice): the queue and the call's result key (a
        replica marks a call it takes there) say whether it did, and only one they do not
        show is sent again, once (a replica that took the first meanwhile answers the
        second from the first run).

        Raises :class:`RedisUnavailable` when Redis refused the connection (nothing was
        sent), else :class:`CallOutcomeUnknown` (with the call's id and response) when the
        call may have been queued and Redis cannot say."""
        failure: Optional[BaseException] = None
        for attempt in range(PUSH_ATTEMPTS):
            try:
                call.writer.lpush(list_key, item)
                return
            except _UNREACHABLE as error:
                failure = error
                if attempt == 0 and _refused(error):
                    raise RedisUnavailable(call.address, str(error).strip()) from None
            try:
                if call.client.lpos(list_key, item) is not None or call.client.exists(result_key(task_id)):
                    return        # it landed: its reply was what got lost
            except _UNREACHABLE:
                break
        response = Response(call, waiter, task_id, self._deployment) if waiter is not None else None
        raise CallOutcomeUnknown(call.address, str(failure).strip(), task_id, response) from None

    def submit(self, *args: Any, **kwargs: Any) -> Job:
        """Queue the call as a job and return its :class:`~taskserve.jobs.Job` once it is
        queued (durably: it survives replica, agent, controller and Redis restarts).

        With ``options(idempotency_key=...)``, the job already submitted under that key
        (while it is kept) is returned instead of queueing a second one.
        """
        return self.submit_many([(args, kwargs)])[0]

    def submit_many(self, calls: Iterable[tuple[Iterable[Any], dict]]) -> list[Job]:
        """Queue many jobs, ``(args, kwargs)`` each, in one round trip; their :class:`Job` s.

        Up to ``SUBMIT_CHUNK`` jobs go in one script call, which records them all or none.
        On a deployment with ``max_queued_requests`` they go in one call, refused as a
        whole (:class:`BackPressureError`) when the queue would hold more than that with them.

        Example::

            jobs = handle.embed.submit_many(([image], {}) for image in images)
        """
        store = current_store()
        address = current_address()
        options = self._options
        calls = [(list(args), dict(kwargs)) for args, kwargs in calls]
        if options.idempotency_key is not None and len(calls) > 1:
            raise ValueError("an idempotency_key names one job: submit jobs with a key one by one")
        if not calls:
            return []
        try:
            self._check(store)
            queue = self._queue()
            call = caller(address, self._serializer)
            list_key = queue_list(queue, priority_to_transport(options.priority))
            # One record's fields for all: the same options, the same moment.
            fields = job_fields(self._deployment, options.method, options.priority, options.max_retries,
                                options.retry_delay_s, time.time(), options.idempotency_key or "")
            chunk = len(calls) if self._checked.max_queued is not None else SUBMIT_CHUNK
            job_ids = []
            with store.redis.pipeline(transaction=False) as pipe:
                for start in range(0, len(calls), chunk):
                    jobs = []
                    for args, kwargs in calls[start:start + chunk]:
                        job_id = new_job_id()
                        jobs.append((job_id, self._encode(call, Call(job_id, options.method, args, kwargs, queue=queue,
                                                                     priority=options.priority, job=True))))
                        job_ids.append(job_id)
                    store.submit_jobs(self._deployment, jobs, list_key, fields, options.idempotency_key or "",
                                      self._checked.max_queued, queue, pipe=pipe)
                replies = pipe.execute()
        except Exception as error:
            cause = _unreachable(error)
            if cause is None:
                raise
            raise RedisUnavailable(address, str(cause).strip()) from None
        for reply in replies:
            outcome = store.submitted(reply)
            if outcome.outcome == "full":
                raise BackPressureError(self._deployment, outcome.queued, self._checked.max_queued or 0)
            if outcome.outcome == "existing":       # an idempotency key: one job
                return [Job(outcome.job_id, self._deployment, store)]
        return [Job(job_id, self._deployment, store) for job_id in job_ids]

    def _encode(self, call: Caller, message: Call) -> bytes:
        try:
            return call.encode(message)
        except (TypeError, ValueError, kombu.exceptions.EncodeError) as error:
            raise TypeError(f"the arguments of this call to {self._deployment!r} cannot travel as "
                            f"{self._serializer} ({error}); pass plain data, or deploy it with serializer='pickle'"
                            ) from None

    def _check(self, store: Store) -> None:
        """Re-read the deployment (one ``MGET``) if the last read is a second old; raise
        if it cannot take calls, or :class:`SignatureError` if its goal is not signed with
        the cluster secret (someone without it wrote the goal: nothing in it is acted on)."""
        checked = self._checked
        now = time.monotonic()
        if now - checked.at >= EXISTENCE_CHECK_INTERVAL_S:
            goal_text, health_text = store.redis.mget([store.goal_key(self._deployment),
                                                       store.health_key(self._deployment)])
            goal = Goal.from_json(goal_text) if goal_text else None
            if goal is None or goal.deleting:
                raise DeploymentNotFound(self._deployment)
            check_callable_goal(goal, self._serializer)
            health = DeploymentHealth.from_json(health_text) if health_text else DeploymentHealth()
            checked.unavailable = unavailable_reason(goal, health, lambda: store.replicas_of(self._deployment, unreadable={}))
            checked.max_queued = goal.options.get("max_queued_requests")
            checked.version = goal.version
            checked.canary_version = goal.canary.version if goal.canary else ""
            checked.canary_percent = goal.canary.traffic_percent if goal.canary else 0.0
            checked.at = now
        if checked.unavailable is not None:
            raise DeploymentUnavailable(self._deployment, checked.unavailable)

    def _queue(self) -> str:
        """The queue of this call: the canary's for its share of the calls (a weighted
        random choice each time) or when pinned to its version, else the deployment's."""
        checked = self._checked
        version = self._options.version
        if version is None:
            to_canary = bool(checked.canary_version) and random.random() * 100 < checked.canary_percent
        elif version == checked.canary_version:
            to_canary = True
        elif version == checked.version:
            to_canary = False
        else:
            runs = repr(checked.version) + (f" and the canary {checked.canary_version!r}" if checked.canary_version else "")
            raise ValueError(f"deployment {self._deployment!r} runs version {runs}, not {version!r}; "
                             "pin one of those, or use a handle without version=")
        return canary_queue_name(self._deployment) if to_canary else queue_name(self._deployment)

    def _check_queue(self, store: Store, limit: int) -> None:
        queued = store.queued_requests(queue_name(self._deployment))
        if queued >= limit:
            raise BackPressureError(self._deployment, queued, limit)

    def __getattr__(self, method: str) -> "DeploymentHandle":
        if method.startswith("_"):
            raise AttributeError(method)
        return self._with(replace(self._options, method=method))

    def __repr__(self) -> str:
        suffix = "" if self._options.method == "__call__" else f".{self._options.method}"
        return f"DeploymentHandle({self._deployment!r}){suffix}"
