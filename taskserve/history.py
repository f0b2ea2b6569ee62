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

import json

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


def describe_change(before: dict | None, after: dict) -> str:
    """What a goal change changed, from the goals of two history entries (dicts).

    >>> one = {"version": "v1", "num_replicas": 1, "options": {"user_config": {"t": 1}}}
    >>> describe_change(None, one)
    'created: version v1, 1 replica, user_config {"t": 1}'
    >>> describe_change(one, {**one, "num_replicas": 3, "options": {"user_config": {"t": 2}}})
    'replicas 1 -> 3; user_config {"t": 1} -> {"t": 2}'
    >>> describe_change(one, {**one, "restart_nonce": "ab"})
    'restarted every replica'
    """
    if before is None or before.get("deleting"):
        text = f"created: version {after.get('version')}, {_replicas(after.get('num_replicas', 0))}"
        config = (after.get("options") or {}).get("user_config")
        return text + (f", user_config {_json(config)}" if config is not None else "")
    parts = []
    if after.get("deleting"):
        return "deleted"
    if before.get("version") != after.get("version"):
        parts.append(f"version {before.get('version')} -> {after.get('version')}")
    if before.get("num_replicas") != after.get("num_replicas"):
        parts.append(f"replicas {before.get('num_replicas')} -> {after.get('num_replicas')}")
    old, new = before.get("options") or {}, after.get("options") or {}
    if old.get("user_config") != new.get("user_config"):
        parts.append(f"user_config {_json(old.get('user_config'))} -> {_json(new.get('user_config'))}")
    others = sorted(key for key in set(old) | set(new)
                    if key not in ("user_config", "num_replicas", "version") and old.get(key) != new.get(key))
    if others:
        parts.append("options changed: " + ", ".join(others))
    if before.get("init_sha") != after.get("init_sha"):
        parts.append("constructor arguments changed")
    elif before.get("code_sha") != after.get("code_sha") and before.get("version") == after.get("version"):
        parts.append("new code")
    if before.get("restart_nonce") != after.get("restart_nonce") and after.get("restart_nonce"):
        parts.append("restarted every replica")
    return "; ".join(parts) or "nothing (the same goal again)"


def annotate(history: list[dict]) -> list[dict]:
    """The entries of a history, oldest first, each with ``change`` (what it changed, in
    words), ``num_replicas`` and ``user_config`` (what the deployment had after it).

    >>> goal = {"version": "v1", "num_replicas": 1, "options": {}}
    >>> entries = annotate([{"action": "deploy", "goal": goal},
    ...                     {"action": "scale", "goal": {**goal, "num_replicas": 2}},
    ...                     {"action": "autoscale", "from": 2, "to": 4, "reason": "load 8"}])
    >>> [(e["change"], e["num_replicas"]) for e in entries]
    [('created: version v1, 1 replica', 1), ('replicas 1 -> 2', 2), ('replicas 2 -> 4: load 8', 4)]
    """
    annotated, before, config = [], None, None
    for entry in history:
        item = dict(entry)
        goal = entry.get("goal")
        if goal:
            item["change"] = describe_change(before, goal)
            item["num_replicas"] = goal.get("num_replicas")
            config = (goal.get("options") or {}).get("user_config")
            before = goal
        else:   # an autoscaling change: a count, no goal of its own
            item["change"] = f"replicas {entry.get('from')} -> {entry.get('to')}" + (
                f": {entry['reason']}" if entry.get("reason") else "")
            item["num_replicas"] = entry.get("to")
        item["user_config"] = config
        annotated.append(item)
    return annotated


def _replicas(count: int) -> str:
    return f"{count} replica" if count == 1 else f"{count} replicas"


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True)
