"""A deployment's records: its goal (and the code it refers to), its history, and the
controller's conclusion about it (its health).

Every goal change is :meth:`Goals.update_goal`: one transaction that writes the goal,
the code blobs it refers to, the deployment's new revision and a history line, retried
on the newer goal if another client wrote in between.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Union

import redis

from ..errors import DeploymentNotFound
from ..state import DeploymentHealth, Goal
from .base import as_text, describe_error
from .events import Events
from .lua import source

HISTORY_LIMIT = 50

# A change for Store.update_goal: from the current goal, the fields to change, a whole
# new goal, or None for nothing to do. It sees None (no deployment) only with missing_ok.
GoalChange = Callable[[Optional[Goal]], Union[Goal, dict[str, Any], None]]


class Goals(Events):
    """The goals, history and health part of :class:`taskserve.store.Store`."""

    def get_goal(self, name: str) -> Optional[Goal]:
        text = self.redis.get(self.goal_key(name))
        return Goal.from_json(text) if text else None

    def require_goal(self, name: str) -> Goal:
        goal = self.get_goal(name)
        if goal is None or goal.deleting:
            raise DeploymentNotFound(name)
        return goal

    def list_goals(self) -> list[Goal]:
        """Every deployment's goal, sorted by name; a goal that cannot be read is
        left out (and logged once)."""
        goals, unreadable = self.read_goals()
        for name, error in unreadable.items():
            self.report_unreadable(f"the goal of deployment {name}", error)
        return goals

    def read_goals(self) -> tuple[list[Goal], dict[str, str]]:
        """Every deployment's goal sorted by name, and the error of each one that
        cannot be read (not JSON, missing fields), by deployment name."""
        names = sorted(as_text(n) for n in self.redis.smembers(self.DEPLOYMENTS_KEY))
        if not names:
            return [], {}
        texts = self.redis.mget([self.goal_key(n) for n in names])
        goals: list[Goal] = []
        unreadable: dict[str, str] = {}
        for name, text in zip(names, texts, strict=True):
            if not text:
                continue
            try:
                goals.append(Goal.from_json(text))
            except Exception as error:
                unreadable[name] = describe_error(error)
        return goals, unreadable

    def write_goal(
        self,
        name: str,
        make_goal: Callable[[Optional[Goal]], Optional[Goal]],
        blobs: Iterable[tuple[str, bytes]] = (),
        event: Optional[dict] = None,
        fence: Optional[str] = None,
    ) -> Optional[Goal]:
        """Replace a deployment's goal atomically and return the goal written.

        The primitive under :meth:`update_goal`, which changes of a deployment use.
        ``make_goal(previous)`` builds the new goal from the one in Redis (None if
        there is none); it is called again if another client wrote in between, so
        the later writer wins cleanly. It returns None to write nothing. ``blobs``
        are ``(sha, bytes)`` uploads (code, working_dir packages); those the new goal
        refers to are stored with it. ``event`` is recorded in the history. With
        ``fence`` (the controller's lease token) nothing is written unless the lease
        still holds it (:class:`LeaseLost`).
        """
        blobs = list(blobs)
        key = self.goal_key(name)

        def write(pipe: redis.client.Pipeline) -> Optional[Goal]:
            self._check_fence(pipe, fence)
            text = pipe.get(key)
            goal = make_goal(Goal.from_json(text) if text else None)
            if goal is None:
                pipe.unwatch()
                return None
            pipe.multi()
            for sha, blob in blobs:
                if sha in goal.blob_shas():
                    pipe.set(self.code_key(sha), blob)
                    pipe.sadd(self.codes_key(name), sha)
            pipe.set(key, goal.to_json())
            pipe.sadd(self.DEPLOYMENTS_KEY, name)
            # Sent whole (EVAL) inside the transaction: a registered script would first
            # cost a round trip to ask whether Redis has it.
            pipe.eval(source("bump_revision"), 2, self.REVISIONS_KEY, self.REVISION_KEY, name)
            if event is not None:
                record = {**event, "generation": goal.generation, "version": goal.version,
                          "goal": json.loads(goal.to_json()), "at": time.time()}
                pipe.rpush(self.history_key(name), json.dumps(record))
                pipe.ltrim(self.history_key(name), -HISTORY_LIMIT, -1)
            return goal

        goal = self.redis.transaction(write, key, *self._fence_keys(fence), value_from_callable=True)
        if goal is not None:
            self.notify(f"goal:{name}")
        return goal

    def update_goal(
        self,
        name: str,
        change: GoalChange,
        action: str,
        *,
        by: Optional[str] = None,
        blobs: Iterable[tuple[str, bytes]] = (),
        event_extra: Optional[dict] = None,
        missing_ok: bool = False,
        fence: Optional[str] = None,
    ) -> Optional[Goal]:
        """Change a deployment's goal to its next generation and record why; return it.

        ``change(previous)`` returns the fields to change (a dict), a whole new goal,
        or None when there is nothing to do (then nothing is written or recorded).
        It is called again on the newer goal if another client wrote in between. The
        goal written gets the next generation and ``created_at`` now, and the history
        an entry with ``action``, ``by`` (default: this user@host), this command line
        (``argv``) and ``event_extra``. ``blobs`` are stored as in :meth:`write_goal`.

        A missing or deleting deployment raises :class:`DeploymentNotFound`; with
        ``missing_ok``, ``change`` sees it instead (None, or the deleting goal) and
        returns a whole goal to create the deployment again, or None. ``fence`` is
        as in :meth:`write_goal`.

        >>> import fakeredis
        >>> from taskserve.store import Store
        >>> store = Store(fakeredis.FakeRedis())
        >>> first = Goal(name="echo", generation=0, version="v1", spec_hash="s1", num_replicas=1,
        ...              options={}, code_sha="c1", init_sha="i1")
        >>> store.update_goal("echo", lambda previous: first, "deploy", missing_ok=True).generation
        1
        >>> store.update_goal("echo", lambda previous: {"num_replicas": 3}, "scale").generation
        2
        >>> store.update_goal("echo", lambda previous: None, "scale") is None
        True
        >>> [(e["action"], e["generation"]) for e in store.history("echo")]
        [('deploy', 1), ('scale', 2)]
        """
        event = {"action": action, "by": by or _user_at_host(), "argv": " ".join(sys.argv[:3]), **(event_extra or {})}

        def make_goal(previous: Optional[Goal]) -> Optional[Goal]:
            if (previous is None or previous.deleting) and not missing_ok:
                raise DeploymentNotFound(name)
            changed = change(previous)
            if changed is None:
                return None
            goal = replace(previous, **changed) if isinstance(changed, dict) else changed
            generation = (previous.generation if previous else 0) + 1
            return replace(goal, generation=generation, created_at=time.time())

        return self.write_goal(name, make_goal, blobs=blobs, event=event, fence=fence)

    def forget_deployment(self, name: str, generation: int, fence: Optional[str] = None) -> bool:
        """Remove a deleted deployment's keys, unless a newer goal was written since."""
        key = self.goal_key(name)

        def forget(pipe: redis.client.Pipeline) -> bool:
            self._check_fence(pipe, fence)
            text = pipe.get(key)
            goal = Goal.from_json(text) if text else None
            if goal is None or not goal.deleting or goal.generation != generation:
                pipe.unwatch()
                return False
            others = [self.codes_key(as_text(n)) for n in pipe.smembers(self.DEPLOYMENTS_KEY) if as_text(n) != name]
            shared = {as_text(s) for s in pipe.sunion(others)} if others else set()
            shas = [as_text(s) for s in pipe.smembers(self.codes_key(name)) if as_text(s) not in shared]
            pipe.multi()
            pipe.delete(key, self.health_key(name), self.codes_key(name),
                        self.replicas_key(name), self.history_key(name), self.scale_key(name),
                        self.stats_key(name))
            for sha in shas:
                pipe.delete(self.code_key(sha))
            pipe.srem(self.DEPLOYMENTS_KEY, name)
            pipe.hdel(self.REVISIONS_KEY, name)
            return True

        forgotten = self.redis.transaction(forget, key, *self._fence_keys(fence), value_from_callable=True)
        if forgotten:
            self.notify(f"deleted:{name}")
        return forgotten

    def has_code(self, sha: str) -> bool:
        """Whether the code blob ``sha`` is still stored (a deployment refers to it)."""
        return bool(self.redis.exists(self.code_key(sha)))

    def get_code(self, sha: str) -> bytes:
        blob = self.redis.get(self.code_key(sha))
        if blob is None:
            raise LookupError(f"code {sha} is missing from Redis; deploy the deployment again")
        return blob

    def history(self, name: str) -> list[dict]:
        """Every goal change of ``name`` and every change of an autoscaled replica count,
        oldest first.

        A goal change holds its ``goal``; an autoscaling change (``action`` "autoscale",
        ``by`` "autoscaler") holds none, but ``from`` and ``to`` (the replica counts), the
        ``reason`` and the generation and version of the goal it scaled.
        """
        return [json.loads(item) for item in self.redis.lrange(self.history_key(name), 0, -1)]

    def record_outcome(self, name: str, generation: int, outcome: str, message: str = "",
                       fence: Optional[str] = None) -> None:
        """Note how the goal change of ``generation`` ended ("done" or "failed")."""
        key = self.history_key(name)

        def record(pipe: redis.client.Pipeline) -> None:
            self._check_fence(pipe, fence)
            items = pipe.lrange(key, 0, -1)
            for index in range(len(items) - 1, -1, -1):
                entry = json.loads(items[index])
                # Autoscaling lines carry the generation they scaled, but no goal of their own.
                if entry.get("generation") == generation and "goal" in entry:
                    break
            else:
                return
            if entry.get("outcome") == outcome:
                return
            entry.update(outcome=outcome, outcome_message=message, outcome_at=time.time())
            pipe.multi()
            pipe.lset(key, index, json.dumps(entry))

        self.redis.transaction(record, key, *self._fence_keys(fence))

    # ------------------------------------------------------------------ health

    def get_health(self, name: str) -> DeploymentHealth:
        text = self.redis.get(self.health_key(name))
        return DeploymentHealth.from_json(text) if text else DeploymentHealth()

    def set_health(self, name: str, health: DeploymentHealth, fence: Optional[str] = None) -> None:
        """Record the controller's conclusion (only while the deployment exists)."""
        keys = [self.goal_key(name), self.health_key(name), self.REVISIONS_KEY, self.REVISION_KEY]
        if self._fenced(self._scripts.set_health, keys, [health.to_json(), name], fence):
            self.notify(f"health:{name}")


def _user_at_host() -> str:
    """Who changes a goal from this process, for the history."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
