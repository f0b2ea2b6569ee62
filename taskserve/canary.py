"""Canary releases: what replicas count per version, and when a canary is aborted.

Pure functions, no I/O. Replicas count the requests they serve in memory
(:func:`count_request`) and add the counts to the deployment's stats hash about once a
second (:meth:`taskserve.store.Store.add_stats`), so counting costs no round trip per
request. The hash holds, per version, ``requests:{version}``, ``errors:{version}`` and
a latency histogram ``le{i}:{version}`` (requests that took at most ``LATENCY_BOUNDS[i]``
seconds, the last bucket unbounded). The controller reads it each pass and asks
:func:`abort_reason` whether the canary must go (SPEC §9, automatic abort).

Example::

    >>> counts = {}
    >>> count_request(counts, "2", 0.03, ok=False)
    >>> counts
    {'requests:2': 1, 'le5:2': 1, 'errors:2': 1}
    >>> stats = VersionStats.of(counts, "2")
    >>> stats.requests, stats.errors, stats.p95
    (1, 1, 0.05)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Optional

from .state import Canary

# Upper bounds (seconds) of the latency buckets; one more bucket holds the slower ones.
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def count_request(counts: dict[str, int], version: str, seconds: float, ok: bool) -> None:
    """Add one request of ``version`` that took ``seconds`` to ``counts`` (a replica's
    counts since its last flush); ``ok`` is False when the user's code raised."""
    bucket = bisect.bisect_left(LATENCY_BOUNDS, seconds)
    for key in (f"requests:{version}", f"le{bucket}:{version}") + (() if ok else (f"errors:{version}",)):
        counts[key] = counts.get(key, 0) + 1


@dataclass(frozen=True)
class VersionStats:
    """What the replicas of one version served: requests, errors, latency histogram.

    >>> stats = VersionStats(requests=40, errors=2, buckets=(0,) * 6 + (37, 3) + (0,) * 8)
    >>> stats.error_rate, stats.p95
    (0.05, 0.25)
    """

    requests: int = 0
    errors: int = 0
    buckets: tuple[int, ...] = ()

    @classmethod
    def of(cls, stats: Mapping[str, int], version: str, baseline: Optional[Mapping[str, int]] = None) -> "VersionStats":
        """``version``'s counters in the stats hash, less those in ``baseline`` (what the
        hash held when a canary started: the two versions are compared from then on).

        >>> VersionStats.of({"requests:1": 50, "errors:1": 5}, "1", baseline={"requests:1": 30, "errors:1": 5})
        VersionStats(requests=20, errors=0, buckets=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        """
        baseline = baseline or {}

        def value(key: str) -> int:
            return max(0, int(stats.get(key, 0)) - int(baseline.get(key, 0)))

        return cls(
            requests=value(f"requests:{version}"),
            errors=value(f"errors:{version}"),
            buckets=tuple(value(f"le{i}:{version}") for i in range(len(LATENCY_BOUNDS) + 1)),
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95(self) -> Optional[float]:
        """The upper bound of the bucket that holds the 95th percentile (seconds; None
        without requests, ``inf`` when it is beyond the last bound)."""
        total = sum(self.buckets)
        if not total:
            return None
        needed, seen = 0.95 * total, 0
        for index, count in enumerate(self.buckets):
            seen += count
            if seen >= needed - 1e-9:
                return LATENCY_BOUNDS[index] if index < len(LATENCY_BOUNDS) else float("inf")
        return float("inf")


def baseline_of(stats: Mapping[str, int], version: str) -> dict[str, int]:
    """``version``'s counters in the stats hash, to pass as ``baseline`` later.

    >>> baseline_of({"requests:1": 3, "requests:2": 9, "le0:1": 3}, "1")
    {'requests:1': 3, 'le0:1': 3}
    """
    return {key: int(count) for key, count in stats.items() if key.partition(":")[2] == version}


def abort_reason(canary: Canary, canary_stats: VersionStats, stable_stats: VersionStats) -> Optional[str]:
    """Why the canary must be aborted, or None while it may go on.

    Nothing is decided before the canary served ``min_requests``. Then it is aborted
    when its error rate is above the stable version's by more than
    ``max_error_rate_increase``, or, with ``max_p95_ratio``, when its p95 latency is
    above that many times the stable's (once the stable served ``min_requests`` too).

    >>> canary = Canary(version="2", spec_hash="s", code_sha="c", init_sha="i", options={},
    ...                 traffic_percent=10, min_requests=20, max_error_rate_increase=0.05)
    >>> abort_reason(canary, VersionStats(19, 19), VersionStats(100, 0)) is None     # too few yet
    True
    >>> abort_reason(canary, VersionStats(20, 1), VersionStats(100, 0)) is None      # 5%: within 5 points
    True
    >>> print(abort_reason(canary, VersionStats(20, 4), VersionStats(100, 1)))
    error rate 20.0% (4 of 20 requests) is 19.0 points above the stable version's 1.0%; max_error_rate_increase is 5.0 points
    """
    if canary_stats.requests < canary.min_requests:
        return None
    increase = canary_stats.error_rate - stable_stats.error_rate
    if increase > canary.max_error_rate_increase + 1e-9:
        return (f"error rate {canary_stats.error_rate:.1%} ({canary_stats.errors} of {canary_stats.requests} "
                f"requests) is {increase * 100:.1f} points above the stable version's "
                f"{stable_stats.error_rate:.1%}; max_error_rate_increase is {canary.max_error_rate_increase * 100:.1f} points")
    ratio = canary.max_p95_ratio
    canary_p95, stable_p95 = canary_stats.p95, stable_stats.p95
    if ratio is not None and canary_p95 is not None and stable_p95 is not None \
            and stable_stats.requests >= canary.min_requests and canary_p95 > ratio * stable_p95:
        return (f"p95 latency {_seconds(canary_p95)} is above {ratio:g} times the stable version's "
                f"{_seconds(stable_p95)} (max_p95_ratio)")
    return None


def _seconds(value: float) -> str:
    """A latency bound for a message.

    >>> _seconds(0.25), _seconds(float("inf"))
    ('<= 0.25s', '> 60s')
    """
    if value == float("inf"):
        return f"> {LATENCY_BOUNDS[-1]:g}s"
    return f"<= {value:g}s"
