"""Jobs: submit now, read the result later (asynchronous inference).

A job is a call whose caller does not wait: ``handle.submit(...)`` queues it durably on
the deployment's own queue and returns a :class:`Job` at once; anyone with its id reads
its state and result later, any number of times, until ``job_ttl_s`` (a day by default)
after it finished.

Example::

    job = handle.options(priority=8, max_retries=3).submit("s3://videos/17.mp4")
    job.id                            # '9f0c...', 128 random bits
    job.status().state                # 'QUEUED', then 'RUNNING' ...
    job.result(timeout=3600)          # the value; FAILED/DEAD raise ReplicaError
    taskserve.get_job(job.id).cancel()

    # in the replica, while a job runs:
    ctx = taskserve.job_context()
    ctx.report(progress=0.4, message="page 4 of 10")
    if ctx.cancelled:
        return

The records, their states and the scripts that move them live in
:mod:`taskserve.store.jobs`; the record's format in :mod:`taskserve.wire`.
"""

from __future__ import annotations

import contextvars
import functools
import time
from typing import Any, Optional

import redis

from .connection import cluster_secret, current_address, current_store
from .errors import DeploymentNotFound, JobCancelled, JobNotFound, RedisUnavailable, ReplicaError, SignatureError
from .signing import ClusterSecret, check_goal
from .store import Store, queue_list, queue_name, result_key
from .wire import (
    CANCELLED,
    DEAD,
    FAILED,
    FINISHED_JOB_STATES,
    JOB_STATES,
    SUCCEEDED,
    JobError,
    JobStatus,
    Outcome,
    decode_answer,
    job_status,
    priority_to_transport,
    revoked_answer,
)

__all__ = ["Job", "JobContext", "JobStatus", "JobError", "get_job", "job_context", "list_jobs", "purge_jobs",
           "retry_jobs"]

# A job's waiter re-reads its record this often even without a publication (one may be
# missed while the pub/sub connection is re-established).
RESULT_RECHECK_S = 1.0
# JobContext.cancelled asks Redis at most this often.
CANCEL_CHECK_S = 0.2
DEFAULT_JOB_TTL_S = 86_400


class Job:
    """A job, by id: its status, result, and cancel. Cheap: it holds no connection."""

    def __init__(self, job_id: str, deployment: str, store: Optional[Store] = None) -> None:
        self.id = job_id
        self.deployment = deployment
        self._store = store

    @property
    def store(self) -> Store:
        return self._store or current_store()

    def status(self) -> JobStatus:
        """The job's :class:`JobStatus`, as its record says now; :class:`JobNotFound` once expired."""
        fields = _unreachable_as_error(lambda: self.store.job_fields(self.id))
        if not fields:
            raise JobNotFound(self.id)
        return job_status(self.id, fields)

    def result(self, timeout: Optional[float] = None) -> Any:
        """The job's value, once it SUCCEEDED (waiting up to ``timeout`` seconds).

        FAILED and DEAD raise :class:`ReplicaError` with the last attempt's error,
        CANCELLED raises :class:`JobCancelled`, and ``TimeoutError`` comes when the time
        runs out (the job keeps going). It can be read any number of times.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = None
        try:
            while True:
                status = self.status()
                if status.finished:
                    return self._outcome(status)
                if pubsub is None:
                    # Subscribed, then the status read again: a publication cannot fall between.
                    pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(result_key(self.id))
                    continue
                wait = RESULT_RECHECK_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"job {self.id} of {self.deployment!r} is {status.state} after {timeout}s; "
                                           "it keeps going: ask job.result() again, or job.status()")
                _unreachable_as_error(functools.partial(pubsub.get_message, timeout=wait))
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except redis.RedisError:
                    pass

    def _outcome(self, status: JobStatus) -> Any:
        if status.state == CANCELLED:
            raise JobCancelled(self.id, status.message)
        data = self.store.job_answer(self.id)
        if status.state == SUCCEEDED and data is not None:
            serializer, secret = self._decoding()
            return decode_answer(data, serializer, secret).result()
        error = status.error or JobError("JobFailed", status.message or status.state.lower())
        raise ReplicaError(error.type, error.message, error.traceback)

    def _decoding(self) -> tuple[str, Optional[ClusterSecret]]:
        goal = self.store.get_goal(self.deployment)
        if goal is not None:      # the serializer is taken from a goal signed with the cluster secret only
            try:
                check_goal(goal, cluster_secret(current_address()))
            except SignatureError as error:
                raise SignatureError(f"deployment {self.deployment!r}: {error}; its answers are not read") from None
        serializer = (goal.options.get("serializer") if goal else None) or "json"
        return serializer, (cluster_secret(current_address()) if serializer == "pickle" else None)

    def cancel(self) -> str:
        """Cancel the job: a QUEUED one never runs (CANCELLED at once); a RUNNING one is
        asked to stop (``job_context().cancelled`` turns True in the replica). Returns the
        state after; a job that finished already is left as it is."""
        state = _unreachable_as_error(lambda: self.store.cancel_job(
            self.deployment, self.id, _job_ttl(self.store, self.deployment), revoked_answer(self.id, "cancelled")))
        if state == "GONE":
            raise JobNotFound(self.id)
        return state

    def __repr__(self) -> str:
        return f"<Job {self.deployment} {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def get_job(job_id: str) -> Job:
    """The job ``job_id`` (of any deployment); :class:`JobNotFound` when unknown or expired."""
    fields = _unreachable_as_error(lambda: current_store().job_fields(job_id))
    if not fields:
        raise JobNotFound(job_id)
    return Job(job_id, job_status(job_id, fields).deployment)


def list_jobs(name: str, state: Optional[str] = None, limit: int = 100) -> list[JobStatus]:
    """The statuses of ``name``'s jobs, newest first: those in ``state`` (one of
    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, DEAD), or of any state; at most ``limit``.

    FAILED and DEAD jobs stay listed with their last error until ``job_ttl_s`` after
    they finished: the dead letters.
    """
    if state is not None and state not in JOB_STATES:
        raise ValueError(f"state={state!r} is not a job state: use one of {', '.join(JOB_STATES)}, or None for all")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit={limit!r}: use a whole number >= 1")
    store = current_store()
    if store.get_goal(name) is None:
        raise DeploymentNotFound(name)
    states = [state] if state else list(JOB_STATES)
    found: list[JobStatus] = []
    for one_state in states:
        ids = store.job_ids(name, one_state, limit)
        found += [job_status(job_id, fields) for job_id, fields in zip(ids, store.jobs_fields(ids)) if fields]
    found.sort(key=lambda status: status.created_at or 0.0, reverse=True)
    return found[:limit]


def retry_jobs(name: str, job_ids: Optional[list[str]] = None, state: Optional[str] = None) -> list[str]:
    """Queue FAILED or DEAD jobs of ``name`` again (a new attempt under the same id, its
    retries counted afresh): those of ``job_ids``, or every one in ``state`` (FAILED or
    DEAD). Returns the ids queued; a job in another state is left alone.

    Every id is checked before any job is queued: an unknown one (:class:`JobNotFound`)
    or another deployment's (``ValueError``) queues none.
    """
    if (job_ids is None) == (state is None):
        raise ValueError("name the jobs to retry: job_ids=[...], or state='FAILED' or 'DEAD'")
    if state is not None and state not in (FAILED, DEAD):
        raise ValueError(f"state={state!r}: only FAILED and DEAD jobs are retried")
    store = current_store()
    if store.get_goal(name) is None:
        raise DeploymentNotFound(name)
    named = job_ids is not None
    if job_ids is None:
        job_ids = store.job_ids(name, state, limit=1_000_000, newest_first=False)
    statuses = []
    for job_id, fields in zip(job_ids, store.jobs_fields(job_ids), strict=True):
        if not fields:
            if not named:
                continue        # expired since the set was read (its entry is trimmed later)
            raise JobNotFound(job_id)
        status = job_status(job_id, fields)
        if status.deployment != name:
            raise ValueError(f"job {job_id} belongs to {status.deployment!r}, not {name!r}")
        statuses.append(status)
    queued = []
    for status in statuses:
        job_id = status.job_id
        if status.state not in (FAILED, DEAD):
            continue
        list_key = queue_list(queue_name(name), priority_to_transport(status.priority))
        if store.requeue_job(name, job_id, status.state, list_key, "queued again by retry") == "1":
            queued.append(job_id)
    return queued


def purge_jobs(name: str, state: str) -> int:
    """Forget ``name``'s jobs in ``state`` (FAILED, DEAD, SUCCEEDED or CANCELLED): their
    records and results; how many."""
    if state not in FINISHED_JOB_STATES:
        raise ValueError(f"state={state!r}: purge finished jobs only, one of {', '.join(sorted(FINISHED_JOB_STATES))}")
    store = current_store()
    purged = 0
    while True:
        job_ids = store.job_ids(name, state, limit=1000)
        if not job_ids:
            return purged
        store.forget_jobs(name, state, job_ids)
        purged += len(job_ids)


def _job_ttl(store: Store, deployment: str) -> float:
    goal = store.get_goal(deployment)
    return float((goal.options.get("job_ttl_s") if goal else None) or DEFAULT_JOB_TTL_S)


def _unreachable_as_error(action: Any) -> Any:
    try:
        return action()
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise RedisUnavailable(current_address(), str(error).strip()) from None


# --------------------------------------------------------------------------- in the replica


class JobContext:
    """What a method running as a job can know and say (``taskserve.job_context()``).

    ``report`` writes at once (the next ``status()`` shows it); ``cancelled`` asks Redis
    at most every ``CANCEL_CHECK_S`` whether the job was cancelled meanwhile.
    """

    def __init__(self, store: Store, job_id: str, attempt: int, deployment: str = "") -> None:
        self._store = store
        self.job_id = job_id
        self.attempt = attempt
        self.deployment = deployment
        self._cancelled = False
        self._checked_at = float("-inf")

    def report(self, progress: Optional[float] = None, message: Optional[str] = None) -> None:
        """Record the job's ``progress`` (0..1) and a status ``message``."""
        if progress is not None:
            if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0 <= progress <= 1:
                raise ValueError(f"progress={progress!r}: use a number from 0 to 1")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"message={message!r}: use a string")
        self._store.report_progress(self.job_id, progress, message)

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled while running: stop soon, cooperatively."""
        if not self._cancelled and time.monotonic() - self._checked_at >= CANCEL_CHECK_S:
            self._checked_at = time.monotonic()
            try:
                self._cancelled = bool(self._store.cancel_requested([self.job_id]))
            except redis.RedisError:
                pass     # Redis away: not known to be cancelled; asked again next time
        return self._cancelled

    def __repr__(self) -> str:
        return f"<JobContext {self.job_id} attempt {self.attempt}>"


_CURRENT: contextvars.ContextVar[Optional[JobContext]] = contextvars.ContextVar("taskserve_job", default=None)


def job_context() -> Optional[JobContext]:
    """The :class:`JobContext` of the job this code runs for, in a replica; None during a
    plain call (or outside a replica)."""
    return _CURRENT.get()


def set_job_context(context: Optional[JobContext]) -> contextvars.Token:
    """Make ``context`` the current job's (the replica does, around a job's method)."""
    return _CURRENT.set(context)


def reset_job_context(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


# What the states mean for status displays and metrics.
FINISHED = FINISHED_JOB_STATES
FAILURE_STATES = frozenset({FAILED, DEAD})
_ = Outcome     # re-exported for the replica's use with the records
