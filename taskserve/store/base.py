"""What every part of the store shares: the client, its scripts, the controller's fence,
the key names as attributes of the store, and the decoding of what Redis returns."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import redis

from ..state import RecordError
from . import keys
from .lua import Scripts

log = logging.getLogger("taskserve.store")


class LeaseLost(RuntimeError):
    """A fenced write was refused: the controller no longer holds the lease it wrote under."""


class StoreBase:
    """The client and its scripts; the parts of :class:`taskserve.store.Store` build on it.

    The key names are attributes too (``Store.goal_key(name)``, ``Store.LEASE_KEY``), as
    callers that read a key directly (a pipeline of their own, a test) spell them.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._scripts = Scripts(client)
        self._reported: dict[str, str] = {}   # what was logged as unreadable, so once per change

    # ------------------------------------------------------------------ keys

    goal_key = staticmethod(keys.goal_key)
    health_key = staticmethod(keys.health_key)
    history_key = staticmethod(keys.history_key)
    code_key = staticmethod(keys.code_key)
    codes_key = staticmethod(keys.codes_key)
    replicas_key = staticmethod(keys.replicas_key)
    replica_key = staticmethod(keys.replica_key)
    control_key = staticmethod(keys.control_key)
    node_replicas_key = staticmethod(keys.node_replicas_key)
    node_alive_key = staticmethod(keys.node_alive_key)
    scale_key = staticmethod(keys.scale_key)
    stats_key = staticmethod(keys.stats_key)
    deliveries_key = staticmethod(keys.deliveries_key)

    DEPLOYMENTS_KEY = keys.DEPLOYMENTS_KEY
    REVISIONS_KEY = keys.REVISIONS_KEY
    REVISION_KEY = keys.REVISION_KEY
    NODES_KEY = keys.NODES_KEY
    LEASE_KEY = keys.LEASE_KEY
    EPOCH_KEY = keys.EPOCH_KEY

    # ------------------------------------------------------------------ the fence

    def _fenced(self, script: Any, script_keys: list[str], args: list[Any], fence: Optional[str]) -> Any:
        """Run one of the fenced scripts; raise :class:`LeaseLost` if the fence refused it."""
        result = script(keys=[self.LEASE_KEY, *script_keys], args=[fence or "", *args])
        if result == -1:
            raise LeaseLost(f"the controller lease {fence!r} is no longer held; nothing was written")
        return result

    def _check_fence(self, pipe: redis.client.Pipeline, fence: Optional[str]) -> None:
        """In a transaction that WATCHes the lease: refuse to go on without it."""
        if fence is not None and as_text(pipe.get(self.LEASE_KEY)) != fence:
            pipe.unwatch()
            raise LeaseLost(f"the controller lease {fence!r} is no longer held; nothing was written")

    def _fence_keys(self, fence: Optional[str]) -> list[str]:
        return [self.LEASE_KEY] if fence is not None else []

    # ------------------------------------------------------------------ records that cannot be read

    def report_unreadable(self, what: str, error: str) -> None:
        """Log that ``what`` cannot be read, once until its error changes."""
        if self._reported.get(what) != error:
            self._reported[what] = error
            log.error("%s cannot be read (%s); skipping it", what, error)


def as_text(value: Optional[Union[str, bytes]]) -> Optional[str]:
    """A value Redis returned, as ``str``.

    >>> as_text(b"echo"), as_text("echo"), as_text(None)
    ('echo', 'echo', None)
    """
    return value.decode() if isinstance(value, bytes) else value


def describe_error(error: BaseException) -> str:
    """An error as one line.

    >>> describe_error(ValueError("Expecting value: line 1 column 1 (char 0)"))
    'ValueError: Expecting value: line 1 column 1 (char 0)'
    >>> describe_error(RecordError("pid is not a number: 'abc'"))      # says what it is already
    "pid is not a number: 'abc'"
    """
    lines = str(error).strip().splitlines()
    if isinstance(error, RecordError) and lines:
        return lines[0]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def decode_hash(fields: dict) -> dict[str, str]:
    """A hash Redis returned, with ``str`` fields and values."""
    return {as_text(k): as_text(v) for k, v in fields.items()}
