"""Calling a deployment from Python: handles and responses.

Example::

    handle = taskserve.get_deployment("echo").get_handle()
    handle.remote("hi").result(timeout=10)      # 'hi'
    handle.pid.remote().result()                # 41237, the replica's process id

What a call costs in Redis: the push of its message and, once :meth:`Response.result`
read the answer, one ``DEL`` of the answer (an answer nobody reads expires after the
deployment's ``result_ttl_s``). A handle re-reads its deployment's goal and health (one
``MGET``) at most once a second, and a deployment with ``max_queued_requests`` costs
one ``LLEN`` per call.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import celery.exceptions
import celery.result
import celery.states
import kombu.exceptions
import redis
from celery import Celery

from .celery_app import TASK_NAME, make_app
from .connection import current_address, current_store
from .errors import BackPressureError, DeploymentNotFound, DeploymentUnavailable, RedisUnavailable, ReplicaError
from .state import DeploymentHealth, DeploymentState, Goal, Replica, ReplicaState
from .store import Store, queue_name

# A handle re-reads its deployment (exists? can serve? queue limit?) at most this often.
EXISTENCE_CHECK_INTERVAL_S = 1.0

# How a caller's Celery app meets a Redis that does not answer: one immediate retry (a
# pooled connection may be stale after a Redis restart), then the error, which the
# caller sees as RedisUnavailable. Replicas retry their result writes for half a
# minute (celery_app); a caller waiting that long would only hide the outage.
CALLER_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
REDIS_CONNECT_TIMEOUT_S = 5.0
# A caller waiting for an answer reads it again this often after Redis went away, for up
# to its timeout (OUTAGE_WAIT_S when it gave none).
OUTAGE_RETRY_S = 0.2
OUTAGE_WAIT_S = 60.0
# A caller still waiting reads its answer's key this often, in case its publication was missed.
RESULT_RECHECK_S = 1.0

# Replicas that take requests from the queue, or may soon (a constructor still running).
SERVING_STATES = frozenset({ReplicaState.STARTING, ReplicaState.RUNNING, ReplicaState.RECONFIGURING})

# What the Redis clients of Celery, kombu and redis-py raise when Redis is away.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError, OSError)


@functools.lru_cache(maxsize=None)
def caller_app(address: str, serializer: str) -> Celery:
    """The one caller-side Celery app per address and serializer in this process."""
    app = make_app(address, serializer)
    app.conf.update(
        result_backend_always_retry=False,
        task_publish_retry_policy=CALLER_RETRY_POLICY,
        result_backend_transport_options={**app.conf.result_backend_transport_options,
                                          "retry_policy": CALLER_RETRY_POLICY},
        redis_socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
    )
    return app


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


def _unreachable(error: BaseException) -> Optional[BaseException]:
    """The connection error behind ``error`` if it means Redis cannot be reached, else None."""
    if isinstance(error, RuntimeError) and isinstance(error.__cause__, _UNREACHABLE):
        return error.__cause__    # Celery's result consumer gave up reconnecting
    if isinstance(error, _UNREACHABLE):
        return error
    return None


class Response:
    """A request in flight; :meth:`result` waits for its value."""

    def __init__(self, async_result: celery.result.AsyncResult, deployment: str, address: str = "") -> None:
        self._async_result = async_result
        self.deployment = deployment
        self._address = address
        self._outcome: Optional[tuple[bool, Any]] = None    # (ok, value or error) once read

    @property
    def request_id(self) -> str:
        return self._async_result.id

    def result(self, timeout: Optional[float] = None) -> Any:
        """The value the replica returned.

        Raises :class:`ReplicaError` if the replica's code raised, ``TimeoutError`` if
        no answer came within ``timeout`` seconds and :class:`RedisUnavailable` if Redis
        cannot be reached. The answer is removed from Redis once read; asking again
        gives the same value.
        """
        if self._outcome is None:
            self._outcome = self._read(timeout)
        ok, value = self._outcome
        if ok:
            return value
        raise value

    def _read(self, timeout: Optional[float]) -> tuple[bool, Any]:
        try:
            envelope, failed, traceback_text = self._await(timeout)
        except celery.exceptions.TimeoutError:
            self._stop_waiting()
            raise self._timed_out(timeout) from None
        except Exception as error:
            cause = _unreachable(error)
            if cause is None:
                raise
            envelope, failed, traceback_text = self._wait_out_outage(timeout, cause)
        self._forget()
        if failed:
            return False, ReplicaError(type(envelope).__name__, str(envelope), traceback_text or "")
        if envelope.get("ok"):
            return True, envelope["value"]
        return False, ReplicaError(envelope["type"], envelope["message"], envelope.get("traceback", ""))

    def _await(self, timeout: Optional[float]) -> tuple[Any, bool, str]:
        """The answer as it is published, read from its key too every ``RESULT_RECHECK_S``.

        Celery's result consumer, reconnecting after Redis went away, reads the keys of
        the answers it awaits and only then subscribes again: an answer published in
        between is never heard of. Reading the key now and then finds it anyway.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_s = RESULT_RECHECK_S if deadline is None else min(RESULT_RECHECK_S, deadline - time.monotonic())
            try:
                envelope = self._async_result.get(timeout=max(wait_s, 0.0), propagate=False,
                                                  disable_sync_subtasks=False)
            except celery.exceptions.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                meta = self._async_result.backend.get_task_meta(self.request_id, cache=False)
                if meta.get("status") not in celery.states.READY_STATES:
                    continue
                self._stop_waiting()
                failed = meta["status"] in celery.states.PROPAGATE_STATES
                return meta.get("result"), failed, meta.get("traceback") or ""
            failed = self._async_result.failed()
            return envelope, failed, (self._async_result.traceback if failed else "")

    def _wait_out_outage(self, timeout: Optional[float], cause: BaseException) -> tuple[Any, bool, str]:
        """Read the answer from its key once Redis is back, within the caller's timeout.

        A request already sent is answered after an outage (replicas retry storing
        their answer), but the pub/sub subscription it was awaited on is gone with the
        connection, so the answer is read from its key. Only when the time is up with
        Redis still away does the caller get :class:`RedisUnavailable`.
        """
        deadline = time.monotonic() + (OUTAGE_WAIT_S if timeout is None else timeout)
        backend = self._async_result.backend
        while True:
            try:
                meta = backend.get_task_meta(self.request_id, cache=False)
                if meta.get("status") in celery.states.READY_STATES:
                    failed = meta["status"] in celery.states.PROPAGATE_STATES
                    return meta.get("result"), failed, meta.get("traceback") or ""
                unreachable = False
            except _UNREACHABLE as error:
                cause, unreachable = error, True
            if time.monotonic() + OUTAGE_RETRY_S >= deadline:
                if unreachable:
                    raise RedisUnavailable(self._address or current_address(), str(cause).strip())
                raise self._timed_out(timeout)
            time.sleep(OUTAGE_RETRY_S)

    def _timed_out(self, timeout: Optional[float]) -> TimeoutError:
        return TimeoutError(
            f"no answer from deployment {self.deployment!r} within {timeout}s "
            f"(request {self.request_id}); `taskserve status {self.deployment}` shows its replicas"
        )

    def _stop_waiting(self) -> None:
        """Unsubscribe from the answer now: left to ``AsyncResult.__del__``, the unsubscribe
        may run while the interpreter shuts down and print a traceback after the error."""
        try:
            self._async_result.backend.remove_pending_result(self._async_result)
        except Exception:   # the timeout is what the caller must see
            pass

    def _forget(self) -> None:
        """Delete the answer from Redis: read, it is of no more use."""
        try:
            self._async_result.forget()
        except _UNREACHABLE:
            pass    # Redis went away after answering; the answer expires on its own

    def __repr__(self) -> str:
        return f"<Response {self.deployment} {self.request_id}>"


@dataclass
class _Checked:
    """What a handle last read of its deployment; shared with its method handles."""

    at: float = float("-inf")
    max_queued: Optional[int] = None
    unavailable: Optional[str] = None


class DeploymentHandle:
    """Sends requests to a deployment's queue.

    ``handle.remote(...)`` calls ``__call__``; ``handle.method.remote(...)`` calls
    another public method. Handles are cheap and safe to share between threads.

    A call fails at once, without queueing, with :class:`DeploymentNotFound` once the
    deployment is deleted, :class:`DeploymentUnavailable` while its rollout failed with
    no replica left to serve, :class:`BackPressureError` while its queue holds
    ``max_queued_requests`` requests and :class:`RedisUnavailable` while Redis is
    away. The first three are read at most once a second, so each takes up to a second
    to show. The queue limit is read with one ``LLEN`` before each push: callers racing
    each other can put a few requests over it.
    """

    def __init__(self, deployment: str, serializer: str = "json", method: str = "__call__") -> None:
        self.deployment = deployment
        self.serializer = serializer
        self.method = method
        self._checked = _Checked()

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        """Enqueue a call and return at once with its :class:`Response`."""
        store = current_store()
        address = current_address()
        try:
            self._check(store)
            if self._checked.max_queued is not None:
                self._check_queue(store, self._checked.max_queued)
            async_result = caller_app(address, self.serializer).send_task(
                TASK_NAME,
                args=(self.method, list(args), kwargs),
                queue=queue_name(self.deployment),
            )
        except kombu.exceptions.EncodeError as error:
            raise TypeError(
                f"the arguments of this call to {self.deployment!r} cannot travel as "
                f"{self.serializer} ({error}); pass plain data, or deploy it with serializer='pickle'"
            ) from None
        except Exception as error:
            cause = _unreachable(error)
            if cause is None:
                raise
            raise RedisUnavailable(address, str(cause).strip()) from None
        return Response(async_result, self.deployment, address)

    def _check(self, store: Store) -> None:
        """Re-read the deployment (one ``MGET``) if the last read is a second old; raise
        if it cannot take calls."""
        checked = self._checked
        now = time.monotonic()
        if now - checked.at >= EXISTENCE_CHECK_INTERVAL_S:
            goal_text, health_text = store.redis.mget([store.goal_key(self.deployment),
                                                       store.health_key(self.deployment)])
            goal = Goal.from_json(goal_text) if goal_text else None
            if goal is None or goal.deleting:
                raise DeploymentNotFound(self.deployment)
            health = DeploymentHealth.from_json(health_text) if health_text else DeploymentHealth()
            checked.unavailable = unavailable_reason(goal, health, lambda: store.replicas_of(self.deployment))
            checked.max_queued = goal.options.get("max_queued_requests")
            checked.at = now
        if checked.unavailable is not None:
            raise DeploymentUnavailable(self.deployment, checked.unavailable)

    def _check_queue(self, store: Store, limit: int) -> None:
        queued = store.redis.llen(queue_name(self.deployment))
        if queued >= limit:
            raise BackPressureError(self.deployment, queued, limit)

    def __getattr__(self, method: str) -> "DeploymentHandle":
        if method.startswith("_"):
            raise AttributeError(method)
        handle = DeploymentHandle(self.deployment, self.serializer, method)
        handle._checked = self._checked
        return handle

    def __repr__(self) -> str:
        suffix = "" if self.method == "__call__" else f".{self.method}"
        return f"DeploymentHandle({self.deployment!r}){suffix}"
