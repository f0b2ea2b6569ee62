"""A steady load of requests with known ids, and the table of what a fault cost.

Each fault test deploys :class:`Recorder`, which answers a request id and appends it
to a Redis list as it serves it, runs a :class:`SteadyLoad` against it, injects its
fault, and reports one :class:`FaultResult` row: requests sent, answered, lost,
duplicated (served more than once: at-least-once redelivery after a crash), failed
with an error, and the time to recover (the longest time no request was answered,
from the fault on).

Example::

    with SteadyLoad(handle, threads=3) as load:
        load.wait_for_answers(20)
        fault_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        load.wait_for_answers(load.answered_count() + 20)
    result = load.result("replica killed", recorder_list, fault_at)
    assert result.lost == 0
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from ..helpers import wait_until

RESULTS: list["FaultResult"] = []


class Recorder:
    """A deployment that records each request id it serves in a Redis list."""

    def __init__(self, address: str, served_key: str, seconds: float = 0.0) -> None:
        self.client = redis.Redis.from_url(address)
        self.served_key = served_key
        self.seconds = seconds

    def __call__(self, request_id: str) -> str:
        if self.seconds:
            time.sleep(self.seconds)
        self.client.rpush(self.served_key, request_id)
        return request_id


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
    answer by then is *lost*, one whose replica raised is *failed*. The loop sends
    at most ``max_requests`` per thread and stops by itself after ``max_seconds``.
    """

    handle: Any
    threads: int = 3
    timeout_s: float = 60.0
    max_requests: int = 5000
    max_seconds: float = 180.0
    sent: list[str] = field(default_factory=list)
    answers: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
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
            try:
                value = self.handle.remote(request_id).result(timeout=self.timeout_s)
            except TimeoutError:
                with self._lock:
                    self.lost.append(request_id)
                continue
            except Exception as error:  # the replica's error, or the client's: counted as failed
                with self._lock:
                    self.failures[request_id] = f"{type(error).__name__}: {error}"
                continue
            with self._lock:
                if value == request_id:
                    self.answers[request_id] = time.monotonic()
                else:
                    self.failures[request_id] = f"wrong answer {value!r}"

    def answered_count(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for_answers(self, count: int, timeout_s: float = 90.0) -> None:
        """Wait until ``count`` requests in all were answered."""
        wait_until(lambda: self.answered_count() >= count, timeout_s, message=f"{count} answers")

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

    def result(self, fault: str, client: redis.Redis, served_key: str, fault_at: float,
               notes: str = "") -> FaultResult:
        """The row for this run (call after :meth:`stop`); also kept for the session's table."""
        served = Counter(item.decode() for item in client.lrange(served_key, 0, -1))
        times = sorted([fault_at, *(t for t in self.answers.values() if t >= fault_at)])
        recovery = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        result = FaultResult(
            fault=fault,
            sent=len(self.sent),
            answered=len(self.answers),
            lost=len(self.lost),
            duplicated=sum(count - 1 for count in served.values() if count > 1),
            failed=len(self.failures),
            recovery_s=recovery,
            notes=notes,
        )
        RESULTS.append(result)
        return result


def describe_failures(load: SteadyLoad, limit: int = 5) -> Optional[str]:
    """A few of the failures, for an assertion message."""
    items = list(load.failures.items())[:limit]
    return "; ".join(f"{key}: {value}" for key, value in items) or None
