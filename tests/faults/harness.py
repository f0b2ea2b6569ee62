"""A steady load of requests with known ids, and the table of what a fault cost.

Each fault test deploys :class:`Recorder`, which answers a request id and appends it
to a Redis list as it serves it, runs a :class:`SteadyLoad` against it, injects its
fault, and reports one :class:`FaultResult` row: requests sent, answered, lost,
duplicated (served more than once: at-least-once redelivery after a crash), failed
with an error, and the time to recover (the longest time no request was answered,
from the fault on).

A fault that refuses calls by design (Redis down: :class:`~taskserve.RedisUnavailable`
at once) shows as *failed*, with the reason in the row's notes; nothing is ever *lost*
(no answer within the request's timeout).

Example::

    model, served = deploy_recorder(url, "echo", num_replicas=2)
    with SteadyLoad(model.get_handle(), threads=3) as load:
        load.wait_for_answers(20)
        fault_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        load.wait_for_more_answers(20)
    result = load.result("replica killed", redis.Redis.from_url(url), served, fault_at,
                         duplicated_because=REDELIVERED)
    check_row(load, result, most_duplicated=1)    # nothing lost or failed; one may run twice
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

import taskserve

from ..helpers import wait_until

RESULTS: list["FaultResult"] = []

# Why a crash may make a request run twice, for a row's notes.
REDELIVERED = "at-least-once redelivery of what a dead replica was serving"
# Why a call fails while Redis is away, for a row's notes.
REFUSED_WHILE_REDIS_DOWN = "calls refused at once while Redis was down (RedisUnavailable), by design"


# How long a Recorder retries its record while Redis restarts (as a replica retries
# storing its result), in steps of RECORD_RETRY_STEP_S.
RECORD_RETRY_S = 30.0
RECORD_RETRY_STEP_S = 0.2


class Recorder:
    """A deployment that records each request id it serves in a Redis list.

    It sleeps ``seconds`` before answering; its record is retried while Redis restarts.
    """

    def __init__(self, address: str, served_key: str, seconds: float = 0.0) -> None:
        retry = Retry(ConstantBackoff(RECORD_RETRY_STEP_S), int(RECORD_RETRY_S / RECORD_RETRY_STEP_S))
        self.client = redis.Redis.from_url(address, retry=retry,
                                           retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.served_key = served_key
        self.seconds = seconds

    def __call__(self, request_id: str) -> str:
        if self.seconds:
            time.sleep(self.seconds)
        self.client.rpush(self.served_key, request_id)
        return request_id

    def pid(self) -> int:
        """The replica's process id."""
        return os.getpid()


def deploy_recorder(address: str, name: str, seconds: float = 0.0, *, target: type = Recorder,
                    timeout: Optional[float] = None, **options: Any) -> tuple[Any, str]:
    """Deploy ``target`` (:class:`Recorder` or a subclass) as ``name``; the deployment
    and the key of the list its replicas record what they serve in."""
    served_key = f"faults:served:{name}"
    model = taskserve.deployment(target).options(name=name, **{"num_cpus": 0.1, **options})
    model.deploy(address, served_key, seconds, timeout=timeout)
    return model, served_key


@dataclass
class FaultResult:
    """One row of the fault table."""

    fault: str
    sent: int
    answered: int
    lost: int
    duplicated: int
    failed: int
    recovery_s: float
    notes: str = ""

    def row(self) -> list[str]:
        return [self.fault, str(self.sent), str(self.answered), str(self.lost), str(self.duplicated),
                str(self.failed), f"{self.recovery_s:.2f}", self.notes]


HEADER = ["fault", "sent", "answered", "lost", "duplicated", "failed", "recovery (s)", "notes"]


def table(results: list[FaultResult]) -> str:
    """The results as a Markdown table."""
    rows = [HEADER, *(result.row() for result in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


@dataclass
class SteadyLoad:
    """Client threads sending request ids one after another until stopped.

    Each request waits up to ``timeout_s`` for its answer; a request that got no
    answer by then is *lost*, one that raised (its replica's error, or the client's,
    such as ``RedisUnavailable``) or got a wrong answer is *failed*, and its thread
    waits ``pause_after_failure_s`` before the next one, so that a fault refusing
    calls at once does not spin. The loop sends at most ``max_requests`` per thread
    and stops by itself after ``max_seconds``.
    """

    handle: Any
    threads: int = 3
    timeout_s: float = 60.0
    max_requests: int = 50_000
    max_seconds: float = 180.0
    pause_after_failure_s: float = 0.1
    sent: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)
    answers: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]

    def _run(self, worker: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        for number in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            request_id = f"{worker}-{number}"
            with self._lock:
                self.sent.append(request_id)
                self.sent_at[request_id] = time.monotonic()
            try:
                value = self.handle.remote(request_id).result(timeout=self.timeout_s)
            except TimeoutError:
                with self._lock:
                    self.lost.append(request_id)
                continue
            except Exception as error:  # the replica's error, or the client's: counted as failed
                self._failed(request_id, f"{type(error).__name__}: {error}")
                continue
            if value != request_id:
                self._failed(request_id, f"WrongAnswer: {value!r}")
                continue
            with self._lock:
                self.answers[request_id] = time.monotonic()

    def _failed(self, request_id: str, why: str) -> None:
        with self._lock:
            self.failures[request_id] = why
            self.failed_at[request_id] = time.monotonic()
        self._stop.wait(self.pause_after_failure_s)

    def answered_count(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for_answers(self, count: int, timeout_s: float = 90.0) -> None:
        """Wait until ``count`` requests in all were answered."""
        wait_until(lambda: self.answered_count() >= count, timeout_s, message=f"{count} answers")

    def wait_for_more_answers(self, count: int, timeout_s: float = 90.0) -> None:
        """Wait until ``count`` more requests than now were answered."""
        self.wait_for_answers(self.answered_count() + count, timeout_s)

    def failure_kinds(self) -> Counter:
        """How many requests failed with each kind of error (its type name)."""
        with self._lock:
            return Counter(why.split(":", 1)[0] for why in self.failures.values())

    def failed_outside(self, start: float, end: float) -> dict[str, str]:
        """The failures of requests that did not overlap ``start`` to ``end`` (monotonic
        times): failed before ``start``, or sent after ``end``."""
        with self._lock:
            return {request_id: why for request_id, why in self.failures.items()
                    if self.failed_at[request_id] < start or self.sent_at[request_id] > end}

    def __enter__(self) -> "SteadyLoad":
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout_s + 30)
        # A wait that raised (Redis away) leaves its Celery result in a reference cycle; collected
        # once its test has stopped that Redis for good, it fails to unsubscribe and warns.
        gc.collect()

    def result(self, fault: str, client: redis.Redis, served_key: str, fault_at: float, notes: str = "", *,
               duplicated_because: str = "", failed_because: str = "") -> FaultResult:
        """The row for this run (call after :meth:`stop`); also kept for the session's table.

        Its notes say why requests were duplicated or failed (``duplicated_because``,
        ``failed_because``) when any were, then ``notes``; failures with no reason given
        are noted by kind, and duplicates as unexpected.
        """
        served = Counter(item.decode() for item in client.lrange(served_key, 0, -1))
        times = sorted([fault_at, *(t for t in self.answers.values() if t >= fault_at)])
        recovery = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        duplicated = sum(count - 1 for count in served.values() if count > 1)
        failed = len(self.failures)
        kinds = ", ".join(f"{kind} x{count}" for kind, count in self.failure_kinds().most_common())
        parts = [f"duplicated {duplicated}: {duplicated_because or 'unexpected'}" if duplicated else "",
                 f"failed {failed}: {failed_because or kinds}" if failed else "",
                 notes]
        result = FaultResult(
            fault=fault,
            sent=len(self.sent),
            answered=len(self.answers),
            lost=len(self.lost),
            duplicated=duplicated,
            failed=failed,
            recovery_s=recovery,
            notes="; ".join(part for part in parts if part),
        )
        RESULTS.append(result)
        return result


def describe_failures(load: SteadyLoad, limit: int = 5) -> Optional[str]:
    """A few of the failures, for an assertion message."""
    items = list(load.failures.items())[:limit]
    return "; ".join(f"{key}: {value}" for key, value in items) or None


def check_row(load: SteadyLoad, result: FaultResult, most_duplicated: Optional[int] = 0,
              refused_between: Optional[tuple[float, float]] = None, refused_as: str = "RedisUnavailable") -> None:
    """Assert that the load came through ``result``'s fault: nothing lost; at most
    ``most_duplicated`` requests served more than once (None: any number); and no
    request failed, or with ``refused_between`` (monotonic times: while Redis was
    down, say) only with ``refused_as``, and only if it was in progress then."""
    assert result.lost == 0, f"{result.lost} lost: {load.lost[:5]}"
    if refused_between is None:
        assert result.failed == 0, describe_failures(load)
    else:
        assert set(load.failure_kinds()) <= {refused_as}, describe_failures(load)
        outside = load.failed_outside(*refused_between)
        assert not outside, f"failed outside the fault: {list(outside.items())[:5]}"
    if most_duplicated is not None:
        assert result.duplicated <= most_duplicated, f"{result.duplicated} duplicated"
