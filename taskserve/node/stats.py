"""What a replica counts and reports: requests per version (for canaries) and how many it holds.

Neither costs a round trip per request: :class:`RequestStats` counts in memory and adds
its counts to the deployment's stats every ``STATS_FLUSH_S``; :class:`InFlightReport`
writes the replica's ``in_flight`` field only when it changed, on the same tick.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import redis

from ..canary import count_request
from ..store import Store
from ..store.stats import JOB_ATTEMPTS_FIELD
from .inflight import InflightFile

log = logging.getLogger("taskserve.node.stats")

# How often a replica adds what it counted (requests, errors, latency) to its
# deployment's stats: one pipelined round trip, whatever the number of requests.
STATS_FLUSH_S = 0.5

# How often the stats tick comes while the replica is idle (nothing counted, no request
# held): it has nothing to write, and its first request wakes it at once (count, took).
STATS_IDLE_S = 10.0

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

    def count_attempt(self) -> None:
        """A job attempt started (counted for the metrics' ``taskserve_job_attempts_total``).

        >>> import fakeredis
        >>> stats = RequestStats(Store(fakeredis.FakeRedis()), "ocr", "1")
        >>> stats.count_attempt(); stats.count_attempt(); stats.flush(), stats.store.stats("ocr")
        (True, {'job_attempts': 2})
        """
        with self.lock:
            self.counts[JOB_ATTEMPTS_FIELD] = self.counts.get(JOB_ATTEMPTS_FIELD, 0) + 1
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
