"""The replica's side of jobs: take one, run it with its context, end it or retry it.

A message is served as a job when it was submitted as one (``handle.submit``) or sent
by a plain Celery producer (``app.send_task``): :attr:`taskserve.wire.Call.durable`.
Every step is one script of :mod:`taskserve.store.jobs`, so the record, the answer and
the message's acknowledgement change together:

* **start**: QUEUED -> RUNNING, one attempt more. A job cancelled while queued, finished
  already (a duplicate) or gone (expired, purged) is acknowledged and not run. A plain
  Celery producer's job gets its record here (its result key says Celery's ``STARTED``
  from the moment a replica took it: :meth:`taskserve.node.transport.ReplicaQoS.record_taken`);
* **end**: SUCCEEDED with the value; an exception with retries left (``max_retries``)
  waits ``retry_delay_s × 2^(failures-1)`` in the delayed set (the controller puts it
  back on the queue when due), else FAILED; DEAD when it cannot run at all (unknown
  method, undecodable, unsigned) or its replicas died under it ``max_deliveries`` times.
  FAILED and DEAD keep their message, for ``taskserve retry``. A job asked to stop
  while it ran ends CANCELLED;
* **ETA**: a message whose Celery ETA is ahead waits in the delayed set too.

A replica dying under a job is not the job's failure: its agent puts the message back
and the next replica starts another attempt without using up a retry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..jobs import JobContext
from ..store import Started, Store, queue_list
from ..store.keys import held_key
from ..wire import (
    CANCELLED,
    DEAD,
    FAILED,
    OPTIONS_HEADER,
    SUCCEEDED,
    TASK_NAME,
    Call,
    Outcome,
    fresh_item,
    job_error,
    job_fields,
    priority_to_transport,
    retry_delay,
    revoked_answer,
)
from .answering import Answerer
from .transport import retry_while_unreachable

log = logging.getLogger("taskserve.node.jobs")

DEFAULT_JOB_TTL_S = 86_400


@dataclass
class Running:
    """A job this replica runs: what starting it found, and its context."""

    started: Started
    context: JobContext


class JobRunner:
    """Starts, ends, retries and buries the jobs of one replica."""

    def __init__(self, store: Store, replica_id: str, deployment: str, answerer: Answerer,
                 job_ttl_s: float = DEFAULT_JOB_TTL_S, on_attempt: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.replica_id = replica_id
        self.deployment = deployment
        self.answerer = answerer
        self.job_ttl_s = job_ttl_s
        self.on_attempt = on_attempt        # an attempt started (the replica's stats count it)

    def admit(self, call: Call, message: Any, refusal: Optional[Outcome],
              resolve: Callable[[str], Any]) -> Optional[Running]:
        """Take a durable call as a job, RUNNING; None when it is not run here and now
        (it waits for its ETA, expired, was refused after replicas died under it —
        ``refusal`` —, names no method — ``resolve`` raises —, or is not to run)."""
        if call.eta is not None and call.eta > time.time():
            self.delay_until_eta(message, call)
            return None
        if call.expired():
            self.bury(message, call.task_id, "it expired before a replica took it", call)
            return None
        if refusal is not None:
            self.bury(message, call.task_id, refusal.message, call)
            return None
        try:
            resolve(call.method)
        except AttributeError as error:
            self.bury(message, call.task_id, str(error), call)
            return None
        return self.start(call, message)

    def bury_if_addressed(self, message: Any, why: str) -> bool:
        """A message that is not a call: if it is a job addressed to this deployment (a
        ``taskserve.call`` task with an id, submitted as a job or by a plain Celery
        producer), it is DEAD and its caller reads why; True then. False: not ours to bury."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = headers.get("id")
        options = headers.get(OPTIONS_HEADER)
        if headers.get("task") != TASK_NAME or not isinstance(task_id, str) or not task_id:
            return False
        if options is not None and not (isinstance(options, dict) and options.get("job")):
            return False
        self.bury(message, task_id, f"its message cannot be run: {why}")
        return True

    def start(self, call: Call, message: Any) -> Optional[Running]:
        """Take ``call`` (a durable one) as RUNNING; None, with its message acknowledged,
        when it is not to run."""
        create = None
        if call.from_celery:
            create = job_fields(self.deployment, call.method, call.priority, 0, 1.0, time.time())
        started = retry_while_unreachable(
            lambda: self.store.start_job(self.deployment, call.task_id, self.replica_id, create), "start a job")
        if not started.runs:
            log.info("job %s not run: it is %s", call.task_id, started.previous.lower())
            self._acknowledge(message)
            return None
        self.on_attempt()
        return Running(started, JobContext(self.store, call.task_id, started.attempt, self.deployment))

    def end(self, message: Any, call: Call, outcome: Outcome, running: Running) -> str:
        """End an attempt with ``outcome``: SUCCEEDED, a retry, or FAILED; the state now."""
        started = running.started
        if outcome.ok:
            return self._finish(message, call, SUCCEEDED, outcome)
        failures = started.failures + 1
        if failures <= started.max_retries:
            delay = retry_delay(started.retry_delay_s or 1.0, failures)
            text = (f"attempt {started.attempt} failed ({outcome.error_type}: {outcome.message}); "
                    f"retry {failures} of {started.max_retries} in {delay:g}s")
            if self._delay(message, call, time.time() + delay, job_error(outcome), failed=True, text=text):
                return "RETRYING"
            return self._finish(message, call, CANCELLED, outcome)
        return self._finish(message, call, FAILED, outcome, keep=True,
                            text=f"failed after {started.attempt} attempt(s)")

    def bury(self, message: Any, call_id: str, why: str, call: Optional[Call] = None) -> None:
        """End a job that cannot run at all (or whose replicas kept dying): DEAD, its
        message kept for inspection and retry."""
        log.error("job %s is dead: %s", call_id, why)
        outcome = Outcome.failure("DeadJob", why)
        dead = call or Call(call_id, "", [], {})
        self._finish(message, dead, DEAD, outcome, keep=True, text=why, create=call is None or call.from_celery)

    def delay_until_eta(self, message: Any, call: Call) -> None:
        """A message whose Celery ETA is ahead: wait in the delayed set until it."""
        if call.from_celery:
            retry_while_unreachable(lambda: self.store.start_job(
                self.deployment, call.task_id, self.replica_id,
                job_fields(self.deployment, call.method, call.priority, 0, 1.0, time.time())), "record a job")
        when = time.strftime("%H:%M:%S", time.localtime(call.eta or time.time()))
        self._delay(message, call, call.eta or time.time(), "", failed=False, text=f"waits for its ETA ({when})")

    # ------------------------------------------------------------------ the scripts

    def _finish(self, message: Any, call: Call, state: str, outcome: Outcome, keep: bool = False, text: str = "",
                create: bool = False) -> str:
        answer = self.answerer.record(call, outcome)
        error = "" if outcome.ok else job_error(outcome)
        kept = fresh_item(message._raw) if keep and message is not None else b""
        tag = message.delivery_tag if message is not None else ""
        if create:
            retry_while_unreachable(lambda: self.store.start_job(
                self.deployment, call.task_id, self.replica_id,
                job_fields(self.deployment, call.method or "?", call.priority, 0, 1.0, time.time())), "record a job")
        ended = retry_while_unreachable(lambda: self.store.finish_job(
            self.deployment, call.task_id, state, self.job_ttl_s, answer, revoked_answer(call.task_id, "cancelled"),
            error, tag, kept, text, held=held_key(self.replica_id)), "end a job")
        if message is not None:
            message.channel.qos.acknowledged_in_redis(tag)
        return str(ended)

    def _delay(self, message: Any, call: Call, due: float, error: str, failed: bool, text: str) -> bool:
        list_key = queue_list(call.queue or message.delivery_info.get("routing_key", ""),
                              priority_to_transport(call.priority))
        done = retry_while_unreachable(lambda: self.store.delay_job(
            self.deployment, call.task_id, due, list_key, fresh_item(message._raw), message.delivery_tag,
            error, failed, text, held=held_key(self.replica_id)), "delay a job")
        if not int(done):
            return False
        message.channel.qos.acknowledged_in_redis(message.delivery_tag)
        return True

    def _acknowledge(self, message: Any) -> None:
        from .answering import acknowledge
        acknowledge([message])
