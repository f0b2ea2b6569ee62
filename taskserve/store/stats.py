"""What the replicas served, counted per deployment and version (see
:mod:`taskserve.canary`): each replica adds its counters about once a second.

>>> import fakeredis
>>> stats = Stats(fakeredis.FakeRedis())
>>> stats.add_stats("echo", {"requests:1": 3, "errors:1": 1})
>>> stats.add_stats("echo", {"requests:1": 2})
>>> sorted(stats.stats("echo").items())
[('errors:1', 1), ('requests:1', 5)]
"""

from __future__ import annotations

from .base import StoreBase, as_text

# The stats hash's count of job attempts the deployment's replicas started (every
# version together: a canary's reset of its version's counters leaves it alone).
JOB_ATTEMPTS_FIELD = "job_attempts"


class Stats(StoreBase):
    """The request counters part of :class:`taskserve.store.Store`."""

    def add_stats(self, name: str, counts: dict[str, int]) -> None:
        """Add a replica's counters (``{"requests:2": 5, ...}``) to the deployment's
        stats, in one round trip."""
        if not counts:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for field_name, count in counts.items():
                pipe.hincrby(self.stats_key(name), field_name, count)
            pipe.execute()

    def stats(self, name: str) -> dict[str, int]:
        """Every counter of the deployment's stats (see :mod:`taskserve.canary`)."""
        return {as_text(k): int(v) for k, v in self.redis.hgetall(self.stats_key(name)).items()}

    def reset_stats(self, name: str, version: str) -> None:
        """Forget what ``version``'s replicas counted (a canary of it starts afresh)."""
        fields = [k for k in self.redis.hkeys(self.stats_key(name)) if as_text(k).partition(":")[2] == version]
        if fields:
            self.redis.hdel(self.stats_key(name), *fields)
