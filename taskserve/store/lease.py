"""The controller's lease: one controller leads at a time, and its writes are fenced by
the lease's token (see :class:`taskserve.store.LeaseLost` and ``scripts/fence.lua``).

The lease's value is ``<epoch>:<controller id>``; the epoch grows with each new
leadership, so no two leaderships share a token.
"""

from __future__ import annotations

from typing import Optional

from .base import StoreBase, as_text


class Lease(StoreBase):
    """The lease part of :class:`taskserve.store.Store`."""

    def acquire_lease(self, holder: str, ttl_s: float) -> Optional[str]:
        """Become or stay the leading controller for ``ttl_s`` seconds.

        Returns the lease token (``"<epoch>:<holder>"``; the epoch grows with each new
        leadership) while ``holder`` leads, None while another controller does. The
        token is the ``fence`` of the leader's writes.

        >>> import fakeredis
        >>> lease = Lease(fakeredis.FakeRedis())
        >>> lease.acquire_lease("a", 5), lease.acquire_lease("b", 5), lease.acquire_lease("a", 5)
        ('1:a', None, '1:a')
        """
        token = self._scripts.acquire_lease(keys=[self.LEASE_KEY, self.EPOCH_KEY], args=[holder, int(ttl_s * 1000)])
        return as_text(token) if token else None

    def renew_lease(self, token: str, ttl_s: float) -> bool:
        """Extend the lease for ``ttl_s`` seconds if it still holds ``token``; False if it was lost."""
        return bool(self._scripts.renew_lease(keys=[self.LEASE_KEY], args=[token, int(ttl_s * 1000)]))

    def lease_holder(self) -> Optional[str]:
        """The id of the leading controller (None if none leads)."""
        value = as_text(self.redis.get(self.LEASE_KEY))
        return value.partition(":")[2] if value else None

    def controller_alive(self) -> bool:
        """True while some controller holds the lease."""
        return bool(self.redis.exists(self.LEASE_KEY))

    def release_lease(self, holder: str) -> None:
        """Give up the lease if ``holder`` (a controller id or its token) holds it."""
        self._scripts.release_lease(keys=[self.LEASE_KEY], args=[holder])
