"""Jobs: their records, the sets of each state, idempotency keys, delayed messages.

Every change of a job's state is one Lua script (``scripts/*_job.lua``), so a record,
its state set, its message and its answer never disagree, whatever fails between
them. Who runs which:

==================  ===========  =============================================================
script              who          what
==================  ===========  =============================================================
``submit_job``      clients      records QUEUED, messages on the queue (idempotent, bounded)
``start_job``       replicas     QUEUED -> RUNNING, one attempt more (a plain Celery
                                 producer's job gets its record here)
``finish_job``      replicas     -> SUCCEEDED, FAILED, CANCELLED or DEAD; answer stored and
                                 published; message acknowledged
``delay_job``       replicas     RUNNING -> QUEUED, the message delayed (a retry, an ETA)
``cancel_job``      clients      QUEUED -> CANCELLED; RUNNING: asked to stop
``requeue_job``     clients      FAILED or DEAD -> QUEUED (``taskserve retry``)
``move_due_jobs``   controller   delayed messages that are due, onto their lists
==================  ===========  =============================================================
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from .base import StoreBase
from .keys import (
    DELAYED_KEY,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    cancel_key,
    idempotency_key,
    job_key,
    jobs_key,
    queue_lists,
    result_key,
    stats_key,
)
from .lua import source
from .stats import JOB_ATTEMPTS_FIELD

# A cancel flag outlives any reasonable wait for the replica to see it.
CANCEL_FLAG_TTL_S = 3600
# The controller moves at most this many due messages per look.
MOVE_DUE_LIMIT = 1000

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, DEAD = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "DEAD"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, DEAD)


@dataclass(frozen=True)
class Submitted:
    """What :meth:`Jobs.submit_jobs` did: ``"submitted"`` (``job_id``: the first job's),
    ``"existing"`` (the job already submitted under the idempotency key: ``job_id`` is its
    id) or ``"full"`` (the queue holds ``queued`` requests, and would hold more than its
    ``max_queued_requests`` with these: none was submitted)."""

    outcome: str
    job_id: str = ""
    queued: int = 0


@dataclass(frozen=True)
class JobSummary:
    """A deployment's jobs at a glance: how many are in each state (finished ones until
    they expire), when its oldest QUEUED job was queued (None: none waits), and the job
    attempts its replicas started."""

    counts: dict[str, int]
    oldest_queued_at: Optional[float]
    attempts: int


@dataclass(frozen=True)
class Started:
    """What :meth:`Jobs.start_job` found: the state the job was in (``"GONE"`` without a
    record), and, for a job to run, its attempt number, failures so far and retry settings."""

    previous: str
    attempt: int = 0
    failures: int = 0
    max_retries: int = 0
    retry_delay_s: Optional[float] = None

    @property
    def runs(self) -> bool:
        return self.previous in (QUEUED, RUNNING)


class Jobs(StoreBase):
    """The jobs part of :class:`taskserve.store.Store`.

    >>> import fakeredis
    >>> jobs = Jobs(fakeredis.FakeRedis())
    >>> jobs.submit_job("ocr", "j1", b"message", "taskserve.ocr", {"deployment": "ocr", "state": "QUEUED"})
    Submitted(outcome='submitted', job_id='j1', queued=0)
    >>> jobs.job_fields("j1")[b"state"], jobs.count_jobs("ocr")[QUEUED]
    (b'QUEUED', 1)
    """

    # ------------------------------------------------------------------ clients

    def submit_job(self, name: str, job_id: str, message: bytes, queue_list_key: str, fields: dict[str, str],
                   key: str = "", max_queued: Optional[int] = None, queue: str = "",
                   pipe: Optional[object] = None) -> Submitted:
        """Record job ``job_id`` of deployment ``name`` as QUEUED and push its ``message``
        onto ``queue_list_key``, in one step: :meth:`submit_jobs` of one job."""
        return self.submit_jobs(name, [(job_id, message)], queue_list_key, fields, key, max_queued, queue, pipe)

    def submit_jobs(self, name: str, jobs: Sequence[tuple[str, bytes]], queue_list_key: str, fields: dict[str, str],
                    key: str = "", max_queued: Optional[int] = None, queue: str = "",
                    pipe: Optional[object] = None) -> Submitted:
        """Record the ``jobs`` (``(job id, message)`` each) of deployment ``name`` as QUEUED,
        each with the record ``fields``, and push their messages onto ``queue_list_key``, in
        one step: all of them or none. With an idempotency ``key`` (one job only), the job
        already submitted under it instead, if there is one. With ``max_queued``, refused
        when ``queue`` (every priority) would hold more than that many requests with them.

        One script call whatever the number of jobs: the fields travel once. With ``pipe``
        (a pipeline) the call is only queued on it; :meth:`submitted` reads its reply.

        >>> import fakeredis
        >>> jobs = Jobs(fakeredis.FakeRedis())
        >>> jobs.submit_jobs("ocr", [("j1", b"m1"), ("j2", b"m2")], "q", {"state": "QUEUED"})
        Submitted(outcome='submitted', job_id='j1', queued=0)
        >>> jobs.redis.lrange("q", 0, -1), jobs.count_jobs("ocr")[QUEUED]    # j1 taken first (BRPOP)
        ([b'm2', b'm1'], 2)
        >>> jobs.submit_jobs("ocr", [("j3", b"m3")], "q", {}, max_queued=2, queue="q")
        Submitted(outcome='full', job_id='', queued=2)
        """
        keys, args = self.submit_jobs_arguments(name, jobs, queue_list_key, fields, key, max_queued, queue)
        if pipe is not None:
            self._scripts.submit_job(keys=keys, args=args, client=pipe)
            return Submitted("pending", jobs[0][0] if jobs else "")
        return self.submitted(self._scripts.submit_job(keys=keys, args=args))

    @staticmethod
    def submit_job_arguments(name: str, job_id: str, message: bytes, queue_list_key: str, fields: dict[str, str],
                             key: str = "", max_queued: Optional[int] = None,
                             queue: str = "") -> tuple[list[str], list[Any]]:
        """The keys and arguments ``scripts/submit_job.lua`` runs with for :meth:`submit_job`:
        for a caller that runs the script on a client of its own (the gateway's asyncio one).

        >>> keys, args = Jobs.submit_job_arguments("ocr", "j1", b"m", "taskserve.ocr", {"state": "QUEUED"}, "k17")
        >>> keys
        ['taskserve:jobs:ocr:QUEUED', 'taskserve.ocr', 'taskserve:job-key:ocr:k17', 'taskserve:job:j1']
        >>> args[1:]
        [0, 0, 2, 'state', 'QUEUED', 'j1', b'm']
        """
        return Jobs.submit_jobs_arguments(name, [(job_id, message)], queue_list_key, fields, key, max_queued, queue)

    @staticmethod
    def submit_jobs_arguments(name: str, jobs: Sequence[tuple[str, bytes]], queue_list_key: str,
                              fields: dict[str, str], key: str = "", max_queued: Optional[int] = None,
                              queue: str = "") -> tuple[list[str], list[Any]]:
        """The keys and arguments ``scripts/submit_job.lua`` runs with for :meth:`submit_jobs`."""
        if key and len(jobs) != 1:
            raise ValueError(f"an idempotency key names one job, not {len(jobs)}")
        lists = queue_lists(queue) if max_queued else []
        keys = [jobs_key(name, QUEUED), queue_list_key, idempotency_key(name, key) if key else "", *lists,
                *(job_key(job_id) for job_id, _ in jobs)]
        args: list[Any] = [repr(time.time()), max_queued or 0, len(lists), 2 * len(fields)]
        for field, value in fields.items():
            args += [field, value]
        for job_id, message in jobs:
            args += [job_id, message]
        return keys, args

    @staticmethod
    def submitted(reply: Sequence) -> Submitted:
        """The :class:`Submitted` of ``submit_job``'s reply."""
        code, value = int(reply[0]), reply[1]
        text = value.decode() if isinstance(value, bytes) else str(value)
        if code == 1:
            return Submitted("submitted", text)
        if code == 0:
            return Submitted("existing", text)
        return Submitted("full", queued=int(text))

    def job_fields(self, job_id: str) -> dict[bytes, bytes]:
        """The record of job ``job_id`` ({} when there is none)."""
        return self.redis.hgetall(job_key(job_id))

    def jobs_fields(self, job_ids: Sequence[str]) -> list[dict[bytes, bytes]]:
        """The records of ``job_ids``, in one round trip ({} for each that is gone)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            return pipe.execute()

    def job_answer(self, job_id: str) -> Optional[bytes]:
        """The answer (result record) of a finished job, None when there is none (yet)."""
        return self.redis.get(result_key(job_id))

    def cancel_job(self, name: str, job_id: str, ttl_s: float, answer: bytes) -> str:
        """Cancel job ``job_id``: its state after (see ``scripts/cancel_job.lua``)."""
        keys, args = self.cancel_job_arguments(name, job_id, ttl_s, answer)
        state = self._scripts.cancel_job(keys=keys, args=args)
        return state.decode() if isinstance(state, bytes) else str(state)

    @staticmethod
    def cancel_job_arguments(name: str, job_id: str, ttl_s: float, answer: bytes) -> tuple[list[str], list[Any]]:
        """The keys and arguments ``scripts/cancel_job.lua`` runs with for :meth:`cancel_job`."""
        return ([job_key(job_id), jobs_key(name, QUEUED), jobs_key(name, CANCELLED), result_key(job_id),
                 cancel_key(job_id)],
                [job_id, repr(time.time()), max(1, int(ttl_s)), answer, CANCEL_FLAG_TTL_S])

    def requeue_job(self, name: str, job_id: str, state: str, queue_list_key: str, message: str) -> str:
        """Queue job ``job_id`` (now in ``state``, FAILED or DEAD) again; "1" or why not."""
        done = self._scripts.requeue_job(
            keys=[job_key(job_id), jobs_key(name, state), jobs_key(name, QUEUED), queue_list_key, result_key(job_id)],
            args=[job_id, repr(time.time()), state, message])
        return done.decode() if isinstance(done, bytes) else str(done)

    def job_ids(self, name: str, state: str, limit: int, newest_first: bool = True) -> list[str]:
        """Up to ``limit`` ids of ``name``'s jobs in ``state``."""
        ids = (self.redis.zrevrange if newest_first else self.redis.zrange)(jobs_key(name, state), 0, limit - 1)
        return [job_id.decode() for job_id in ids]

    def count_jobs(self, name: str) -> dict[str, int]:
        """How many of ``name``'s jobs are in each state (finished ones until they expire)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for state in STATES:
                pipe.zcard(jobs_key(name, state))
            return dict(zip(STATES, (int(count) for count in pipe.execute()), strict=True))

    def oldest_queued(self, names: Iterable[str]) -> dict[str, Optional[float]]:
        """When the oldest QUEUED job of each of ``names`` was queued (None: none waits)."""
        names = list(names)
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zrange(jobs_key(name, QUEUED), 0, 0, withscores=True)
            rows = pipe.execute()
        return {name: (row[0][1] if row else None) for name, row in zip(names, rows, strict=True)}

    def job_summaries(self, names: Iterable[str], pipe: Optional[object] = None) -> Any:
        """The :class:`JobSummary` of each of ``names``, in one command whatever their
        number (``scripts/job_summaries.lua``). With ``pipe`` the command is only queued
        on it (as an ``EVAL`` of the script's text: a pipeline that runs a registered
        script first asks Redis whether it has it, one more round trip on every read);
        :meth:`job_summaries_of` reads its reply.

        >>> import fakeredis
        >>> jobs = Jobs(fakeredis.FakeRedis())
        >>> _ = jobs.submit_job("ocr", "j1", b"m", "taskserve.ocr", {"deployment": "ocr", "state": "QUEUED"})
        >>> summary = jobs.job_summaries(["ocr", "idle"])
        >>> summary["ocr"].counts["QUEUED"], summary["ocr"].oldest_queued_at > 0, summary["idle"]
        (1, True, JobSummary(counts={'QUEUED': 0, 'RUNNING': 0, 'SUCCEEDED': 0, 'FAILED': 0, 'CANCELLED': 0, 'DEAD': 0}, oldest_queued_at=None, attempts=0))
        """
        names = list(names)
        keys = [key for name in names for key in (*(jobs_key(name, state) for state in STATES), stats_key(name))]
        if pipe is not None:
            pipe.eval(source("job_summaries"), len(keys), *keys, JOB_ATTEMPTS_FIELD)  # type: ignore[attr-defined]
            return None
        return self.job_summaries_of(names, self._scripts.job_summaries(keys=keys, args=[JOB_ATTEMPTS_FIELD]) if names
                                     else [])

    @staticmethod
    def job_summaries_of(names: Sequence[str], reply: Sequence[Any]) -> dict[str, JobSummary]:
        """The :class:`JobSummary` of each of ``names`` from ``scripts/job_summaries.lua``'s reply."""
        summaries = {}
        for index, name in enumerate(names):
            row = reply[index * 8:(index + 1) * 8]
            oldest = row[6].decode() if isinstance(row[6], bytes) else str(row[6])
            summaries[name] = JobSummary(dict(zip(STATES, (int(count) for count in row[:6]), strict=True)),
                                         float(oldest) if oldest else None, int(row[7]))
        return summaries

    def forget_jobs(self, name: str, state: str, job_ids: Sequence[str]) -> int:
        """Delete the records, answers and set entries of ``job_ids`` (in ``state``); how many."""
        if not job_ids:
            return 0
        with self.redis.pipeline(transaction=True) as pipe:
            for job_id in job_ids:
                pipe.delete(job_key(job_id), result_key(job_id))
            pipe.zrem(jobs_key(name, state), *job_ids)
            *_, removed = pipe.execute()
        return int(removed)

    def trim_finished_jobs(self, name: str, older_than: float) -> int:
        """Drop the set entries of ``name``'s finished jobs that finished before
        ``older_than`` (their records have expired); how many."""
        with self.redis.pipeline(transaction=False) as pipe:
            for state in (SUCCEEDED, FAILED, CANCELLED, DEAD):
                pipe.zremrangebyscore(jobs_key(name, state), "-inf", older_than)
            return sum(int(count) for count in pipe.execute())

    # ------------------------------------------------------------------ replicas

    def start_job(self, name: str, job_id: str, replica_id: str, create: Optional[dict[str, str]] = None) -> Started:
        """Job ``job_id`` taken by ``replica_id``: RUNNING unless it is not to run (see
        :class:`Started`). ``create``: the record of a job that may have none (a plain
        Celery producer's), made RUNNING."""
        args: list = [job_id, replica_id, repr(time.time()), "1" if create else "0"]
        for field, value in (create or {}).items():
            args += [field, value]
        previous, attempt, failures, max_retries, delay = self._scripts.start_job(
            keys=[job_key(job_id), jobs_key(name, QUEUED), jobs_key(name, RUNNING)], args=args)
        previous = previous.decode() if isinstance(previous, bytes) else str(previous)
        delay_text = delay.decode() if isinstance(delay, bytes) else str(delay)
        return Started(previous, int(attempt), int(failures), int(max_retries),
                       float(delay_text) if delay_text else None)

    def finish_job(self, name: str, job_id: str, state: str, ttl_s: float, answer: bytes, cancelled_answer: bytes,
                   error: str = "", delivery_tag: str = "", keep_message: bytes = b"", message: str = "",
                   held: str = "", pipe: Optional[object] = None) -> Any:
        """Job ``job_id`` ends in ``state``; its ``answer`` is stored and published, its
        message (``delivery_tag``) acknowledged, all in one step (queued on ``pipe`` if
        given). A job asked to stop while it ran ends CANCELLED (with ``cancelled_answer``)
        unless ``state`` is DEAD; the state it ended in is returned."""
        ended = self._scripts.finish_job(
            keys=[job_key(job_id), jobs_key(name, QUEUED), jobs_key(name, RUNNING), jobs_key(name, state),
                  result_key(job_id), UNACKED_KEY, UNACKED_INDEX_KEY, jobs_key(name, CANCELLED), held],
            args=[job_id, state, repr(time.time()), max(1, int(ttl_s)), answer, error, delivery_tag,
                  keep_message, message, cancelled_answer],
            client=pipe)
        return ended.decode() if isinstance(ended, bytes) else ended

    def delay_job(self, name: str, job_id: str, due: float, list_key: str, queue_message: bytes, delivery_tag: str,
                  error: str = "", failed: bool = False, message: str = "", held: str = "",
                  pipe: Optional[object] = None) -> Any:
        """Job ``job_id`` waits until ``due`` (a retry's backoff, an ETA): QUEUED, its
        ``queue_message`` delayed for ``list_key``, the taken one acknowledged. Returns 1,
        or 0 when the job was asked to stop meanwhile (nothing done: end it CANCELLED)."""
        return self._scripts.delay_job(
            keys=[job_key(job_id), jobs_key(name, QUEUED), jobs_key(name, RUNNING), DELAYED_KEY, UNACKED_KEY,
                  UNACKED_INDEX_KEY, held, result_key(job_id)],
            args=[job_id, repr(time.time()), repr(due), list_key.encode() + b"\n" + queue_message, error,
                  "1" if failed else "0", delivery_tag, message],
            client=pipe)

    def report_progress(self, job_id: str, progress: Optional[float], message: Optional[str]) -> None:
        """A running job's progress (0..1) and status message, as its method reports them."""
        fields = {}
        if progress is not None:
            fields["progress"] = repr(float(progress))
        if message is not None:
            fields["message"] = message
        if fields:
            self.redis.hset(job_key(job_id), mapping=fields)

    def cancel_requested(self, task_ids: Sequence[str]) -> set[str]:
        """Which of ``task_ids`` (running calls and jobs) were asked to stop."""
        if not task_ids:
            return set()
        flags = self.redis.mget([cancel_key(task_id) for task_id in task_ids])
        return {task_id for task_id, flag in zip(task_ids, flags, strict=True) if flag}

    def request_cancel(self, task_id: str) -> None:
        """Ask whoever runs ``task_id`` to stop (a call whose caller left, a stream)."""
        self.redis.set(cancel_key(task_id), "1", ex=CANCEL_FLAG_TTL_S)

    # ------------------------------------------------------------------ the controller

    def move_due_jobs(self, now: Optional[float] = None, limit: int = MOVE_DUE_LIMIT) -> tuple[int, Optional[float]]:
        """Push the delayed messages that are due onto their lists; (how many, when the
        next one is due)."""
        moved, next_due = self._scripts.move_due_jobs(keys=[DELAYED_KEY], args=[repr(now or time.time()), limit])
        next_text = next_due.decode() if isinstance(next_due, bytes) else str(next_due)
        return int(moved), (float(next_text) if next_text else None)
