"""The controller's autoscaling decisions: one ``scale`` key per autoscaled deployment,
apart from its goal, and a history line for each change of its replica count.

An autoscaling change writes no goal and uses up no generation: a ``deploy()`` waiting
for its rollout is not disturbed, and a new controller goes on from the count stored.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Optional

from ..state import AutoscaleState
from .base import StoreBase, describe_error
from .goals import HISTORY_LIMIT

# At most this many of the history's entries are autoscaling changes: a busy autoscaler
# drops its own oldest line, so the goals a rollback goes back to stay.
AUTOSCALE_HISTORY_LIMIT = 20
AUTOSCALE_ACTION = "autoscale"

# How an autoscaling history entry's JSON starts (set_autoscale_state writes "action" first).
_AUTOSCALE_ENTRY_PREFIX = json.dumps({"action": AUTOSCALE_ACTION})[:-1]

__all__ = ["AUTOSCALE_ACTION", "AUTOSCALE_HISTORY_LIMIT", "Autoscale", "AutoscaleState"]


class Autoscale(StoreBase):
    """The autoscaling part of :class:`taskserve.store.Store`."""

    def autoscale_state(self, name: str) -> Optional[AutoscaleState]:
        """What the controller decided for the autoscaled deployment ``name`` (None before
        its first decision, or when the record cannot be read, which is logged once).

        Callers show it only while the goal has an ``autoscaling_config``.
        """
        return self.autoscale_states([name])[name]

    def autoscale_states(self, names: Iterable[str]) -> dict[str, Optional[AutoscaleState]]:
        """:meth:`autoscale_state` of each of ``names``, in one ``MGET``.

        >>> import fakeredis
        >>> Autoscale(fakeredis.FakeRedis()).autoscale_states(["echo"])
        {'echo': None}
        """
        names = list(names)
        if not names:
            return {}
        states: dict[str, Optional[AutoscaleState]] = {}
        for name, text in zip(names, self.redis.mget([self.scale_key(n) for n in names]), strict=True):
            states[name] = None
            if text is not None:
                try:
                    states[name] = AutoscaleState.from_json(text)
                except (ValueError, TypeError) as error:
                    self.report_unreadable(f"the autoscaling state of deployment {name}", describe_error(error))
        return states

    def set_autoscale_state(self, name: str, state: AutoscaleState, change: Optional[dict] = None,
                            fence: Optional[str] = None) -> bool:
        """Record the controller's autoscaling decision for ``name`` (only while the
        deployment exists); True if written.

        ``change``, when the target changed, is the history entry that says so: it is
        recorded as an ``action`` "autoscale" by "autoscaler" entry with the time, in the
        same atomic write. The history keeps at most ``AUTOSCALE_HISTORY_LIMIT`` of them.
        No goal changes and no generation is used up: a ``deploy()`` waiting for its
        rollout is not disturbed. ``fence`` is the controller's lease token.

        >>> import fakeredis
        >>> Autoscale(fakeredis.FakeRedis()).set_autoscale_state("echo", AutoscaleState(target=2))   # no such deployment
        False
        """
        entry = ""
        if change is not None:
            entry = json.dumps({"action": AUTOSCALE_ACTION, "by": "autoscaler", **change, "at": time.time()})
        keys = [self.goal_key(name), self.scale_key(name), self.history_key(name)]
        args = [state.to_json(), entry, HISTORY_LIMIT, AUTOSCALE_HISTORY_LIMIT, _AUTOSCALE_ENTRY_PREFIX]
        return bool(self._fenced(self._scripts.set_scale, keys, args, fence))

    def delete_autoscale_states(self, names: Iterable[str], fence: Optional[str] = None) -> int:
        """Forget the autoscaling states of ``names`` (their deployments no longer
        autoscale); how many there were."""
        keys = [self.scale_key(name) for name in names]
        if not keys:
            return 0
        return int(self._fenced(self._scripts.delete_fenced, keys, [], fence))
