"""Reading a deployment's history of goals: what to roll back to.

Each goal change is what :meth:`taskserve.store.Store.write_goal` recorded: the action
("deploy", "scale", "restart", "rollback", "auto-rollback", "delete"), who, when,
the generation and the whole goal, and once known its outcome ("done"/"failed").
The autoscaler's changes of the replica count are entries too ("autoscale", by
"autoscaler", with ``from``, ``to`` and ``reason``), with no goal of their own: they are
never gone back to.

Example::

    >>> from taskserve.state import Goal
    >>> def goal(generation, version):
    ...     return Goal(name="m", generation=generation, version=version, spec_hash=version,
    ...                 num_replicas=1, options={}, code_sha="c", init_sha="i")
    >>> history = [{"generation": g.generation, "action": "deploy", "goal": g.__dict__}
    ...            for g in (goal(1, "v1"), goal(2, "v2"))]
    >>> previous_goal(history, goal(3, "v2")).version
    'v1'
    >>> history.append({"generation": 2, "action": "autoscale", "by": "autoscaler", "from": 1, "to": 3})
    >>> previous_goal(history, goal(3, "v2")).version
    'v1'
"""

from __future__ import annotations

from .state import Goal


def previous_goal(history: list[dict], current: Goal, version: str | None = None) -> Goal | None:
    """The newest goal in ``history`` before ``current`` that ran other code or config.

    With ``version``, the newest one of that version instead. Entries without a goal
    (autoscaling changes) are passed over.
    """
    for entry in reversed(history):
        goal_data = entry.get("goal")
        if not goal_data or entry.get("generation", 0) >= current.generation or entry.get("action") == "delete":
            continue
        if entry.get("outcome") == "failed":
            continue
        candidate = Goal(**goal_data)
        if version is not None:
            if candidate.version == version:
                return candidate
        elif (candidate.spec_hash, candidate.user_config_hash) != (current.spec_hash, current.user_config_hash):
            return candidate   # another version or user_config; a restart alone is neither
    return None
