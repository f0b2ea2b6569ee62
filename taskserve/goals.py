"""A deployment's next goal: the update rules of SPEC §2, as one pure function.

Every change a client makes to a goal — ``deploy()``, a deploy of code already in the
cluster, ``scale``, ``reconfigure``, ``restart``, ``rollback``, ``promote`` — is a
:class:`Proposal` of what the deployment should be, and :func:`next_goal` decides from
the previous goal what that means for its replicas (a :class:`GoalDecision`):

==============================================  =======================================
the proposal, against the previous goal          :class:`Change`
==============================================  =======================================
no previous goal (or one being deleted)          ``FIRST``
another spec: version, init args, resources,     ``ROLL``: every replica is replaced, in
runtime_env, serializer, max_concurrent_queries  rolling batches
(a deploy without a version gets a fresh one,
so it always rolls)
the same spec and a new restart nonce            ``RESTART``: replaced, same version
the same spec, another ``user_config``           ``RECONFIGURE``: in place, no restart
the same spec, another ``num_replicas`` or       ``SCALE``: running replicas keep running
``autoscaling_config``
the same spec, other options (timeouts, route,   ``UPDATE``: in place
rollout), or the end of a canary
the same spec, nothing changed, the previous     ``RETRY``: written again
goal failed
the same spec, nothing changed, the previous     ``RESIGN``: written again, sealed now
goal not sealed with the signing secret (or its
code not to be trusted)
the same spec, nothing changed                   ``NOTHING``: nothing is written
==============================================  =======================================

With the same spec, the goal keeps the code the previous one runs (when that can be
trusted), so that replicas started by a scale-up run what the others run.

The decision reads nothing and signs nothing: the shells in :mod:`taskserve.api` and
:mod:`taskserve.controller` give it what they know (did the previous goal fail, can its
code be trusted, is it sealed with the signing secret) and seal the goal it returns.

Example::

    >>> from taskserve.spec import validate_options
    >>> options = validate_options({"name": "echo", "version": "1", "num_replicas": 2})
    >>> first = propose("echo", options, code_sha="c1", init_sha="i1")
    >>> decision = next_goal(None, first)
    >>> decision.change, decision.goal.num_replicas
    (<Change.FIRST: 'first deploy'>, 2)
    >>> previous = decision.goal
    >>> next_goal(previous, first).change
    <Change.NOTHING: 'nothing to do'>
    >>> scaled = next_goal(previous, propose("echo", validate_options({"num_replicas": 3}, options),
    ...                                      code_sha="c2", init_sha="i1"))
    >>> scaled.change, scaled.goal.code_sha       # the code that runs, not the new upload
    (<Change.SCALE: 'scale'>, 'c1')
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Callable, Optional

from .spec import DeploymentOptions, replica_spec_hash
from .state import Canary, Goal

# Options whose change only moves the replica count.
SCALE_OPTIONS = frozenset({"num_replicas", "autoscaling_config"})


class Change(str, Enum):
    """What a goal change does to the replicas (:func:`next_goal`)."""

    NOTHING = "nothing to do"
    FIRST = "first deploy"
    ROLL = "rolling update"
    RESTART = "restart"
    RECONFIGURE = "reconfigure"
    SCALE = "scale"
    UPDATE = "update in place"
    RETRY = "retry"
    RESIGN = "sign again"
    CANARY = "canary"


@dataclass(frozen=True)
class Proposal:
    """What a deployment should be: all of a goal that a client decides.

    ``options`` are the deployment's options as a goal holds them (:func:`goal_options`:
    no ``num_replicas``, which is ``num_replicas`` here, and no ``canary``). ``code_sha``
    is the code it runs if it rolls; ``restart_nonce`` a new nonce to replace every
    replica, or None to keep the previous goal's.
    """

    name: str
    version: str
    spec_hash: str
    num_replicas: int
    options: dict[str, Any]
    code_sha: str
    init_sha: str
    kind: str = "class"
    user_version: Optional[str] = None
    has_reconfigure: bool = False
    restart_nonce: Optional[str] = None

    def goal(self, code_sha: str, restart_nonce: str) -> Goal:
        """The goal of this proposal running ``code_sha``; generation, timestamps and
        signatures are set when it is written."""
        return Goal(name=self.name, generation=0, version=self.version, spec_hash=self.spec_hash,
                    num_replicas=self.num_replicas, options=self.options, code_sha=code_sha,
                    init_sha=self.init_sha, kind=self.kind, user_version=self.user_version,
                    restart_nonce=restart_nonce, has_reconfigure=self.has_reconfigure)


@dataclass(frozen=True)
class GoalDecision:
    """What :func:`next_goal` decided: the ``change``, the ``goal`` to write (None for
    ``NOTHING``; unsigned, with generation 0) and the names of what changed."""

    change: Change
    goal: Optional[Goal]
    changed: tuple[str, ...] = ()


def goal_options(options: DeploymentOptions) -> dict[str, Any]:
    """The options as a goal holds them: as plain JSON data (tuples are lists), without
    ``num_replicas`` (the goal's own field) and ``canary`` (the goal's canary).

    >>> from taskserve.spec import validate_options
    >>> held = goal_options(validate_options({"num_replicas": 2, "user_config": {"t": (1, 2)}}))
    >>> "num_replicas" in held, "canary" in held, held["user_config"]
    (False, False, {'t': [1, 2]})
    """
    data = json.loads(json.dumps(options.model_dump()))
    data.pop("num_replicas", None)
    data.pop("canary", None)
    return data


def propose(name: str, options: DeploymentOptions, *, code_sha: str, init_sha: str, kind: str = "class",
            has_reconfigure: bool = False, new_version: Callable[[], str] = lambda: secrets.token_hex(4)) -> Proposal:
    """The proposal of a deploy of ``options`` running the code ``code_sha`` with the
    constructor arguments ``init_sha``. Without a version, it gets a fresh one from
    ``new_version``: an unversioned deploy always rolls.

    >>> from taskserve.spec import validate_options
    >>> proposal = propose("m", validate_options({}), code_sha="c", init_sha="i", new_version=lambda: "f00")
    >>> proposal.version, proposal.user_version
    ('f00', None)
    """
    version = options.version or new_version()
    return Proposal(name=name, version=version, spec_hash=replica_spec_hash(options, version, init_sha),
                    num_replicas=options.num_replicas, options=goal_options(options), code_sha=code_sha,
                    init_sha=init_sha, kind=kind, user_version=options.version, has_reconfigure=has_reconfigure)


def proposal_of(goal: Goal) -> Proposal:
    """A goal as a proposal: what a change of one part of it (the count, the config, a
    restart) starts from.

    >>> goal = Goal(name="m", generation=4, version="1", spec_hash="s", num_replicas=2, options={"t": 1},
    ...             code_sha="c", init_sha="i", user_version="1")
    >>> next_goal(goal, proposal_of(goal)).change
    <Change.NOTHING: 'nothing to do'>
    """
    return Proposal(name=goal.name, version=goal.version, spec_hash=goal.spec_hash, num_replicas=goal.num_replicas,
                    options=dict(goal.options), code_sha=goal.code_sha, init_sha=goal.init_sha, kind=goal.kind,
                    user_version=goal.user_version, has_reconfigure=goal.has_reconfigure)


def scaled(previous: Goal, num_replicas: int) -> Proposal:
    """``previous`` with ``num_replicas`` replicas."""
    return replace(proposal_of(previous), num_replicas=num_replicas)


def reconfigured(previous: Goal, user_config: Any) -> Proposal:
    """``previous`` with another ``user_config``."""
    proposal = proposal_of(previous)
    return replace(proposal, options={**proposal.options, "user_config": json.loads(json.dumps(user_config))})


def restarted(previous: Goal, nonce: str) -> Proposal:
    """``previous`` with a new restart nonce: every replica is replaced."""
    return replace(proposal_of(previous), restart_nonce=nonce)


def rolled_back(current: Goal, target: Goal) -> Proposal:
    """Going back from ``current`` to what ``target`` (an earlier goal) ran: its version,
    code, options and restart nonce (its replicas, where some still run, are current
    again), with the replica count, and whether the controller sets it, as they are now
    (the scale is not part of a version).

    >>> now = Goal(name="m", generation=5, version="2", spec_hash="s2", num_replicas=4,
    ...            options={"autoscaling_config": None, "user_config": 2}, code_sha="c2", init_sha="i")
    >>> then = replace(now, generation=3, version="1", spec_hash="s1", num_replicas=1, code_sha="c1",
    ...                options={"user_config": 1})
    >>> back = rolled_back(now, then)
    >>> back.version, back.num_replicas, back.options
    ('1', 4, {'user_config': 1, 'autoscaling_config': None})
    """
    options = dict(target.options)
    if "autoscaling_config" in current.options or "autoscaling_config" in target.options:
        options["autoscaling_config"] = current.options.get("autoscaling_config")
    return replace(proposal_of(target), num_replicas=current.num_replicas, options=options,
                   restart_nonce=target.restart_nonce)


def promoted(current: Goal) -> Proposal:
    """The stable version replaced by ``current``'s canary (its version, code and options),
    at the current replica count."""
    canary = current.canary
    if canary is None:
        raise ValueError(f"deployment {current.name!r} runs no canary; start one with "
                         f"`taskserve deploy ... --version V --canary PERCENT`")
    return Proposal(name=current.name, version=canary.version, spec_hash=canary.spec_hash,
                    num_replicas=current.num_replicas, options=dict(canary.options), code_sha=canary.code_sha,
                    init_sha=canary.init_sha, kind=canary.kind, user_version=canary.version,
                    has_reconfigure=canary.has_reconfigure)


def next_goal(previous: Optional[Goal], proposal: Proposal, *, failed: bool = False, trusted: bool = True,
              signed_now: bool = True) -> GoalDecision:
    """What writing ``proposal`` over ``previous`` does (the table in the module docstring).

    ``failed``: the previous goal's rollout failed (then the same goal is tried again
    rather than taken as done). ``trusted``: the previous goal passed the signature check
    and its code is sealed with the cluster secret, so its code may run on (else the
    proposal's code runs, and the goal is written again). ``signed_now``: the previous
    goal is sealed with the secret that signs now (after a rotation it is written again).
    A canary of the previous goal ends unless the proposal is the previous goal itself
    with nothing to do.
    """
    if previous is None or previous.deleting:
        nonce = proposal.restart_nonce or ""
        return GoalDecision(Change.FIRST, proposal.goal(proposal.code_sha, nonce))
    if previous.spec_hash != proposal.spec_hash:
        nonce = proposal.restart_nonce or ""
        return GoalDecision(Change.ROLL, proposal.goal(proposal.code_sha, nonce), _differences(previous, proposal))
    changed = _differences(previous, proposal)
    restart = proposal.restart_nonce is not None and proposal.restart_nonce != previous.restart_nonce
    nonce = proposal.restart_nonce if restart else previous.restart_nonce
    goal = proposal.goal(previous.code_sha if trusted else proposal.code_sha, nonce or "")
    if restart:
        return GoalDecision(Change.RESTART, goal, changed)
    if "user_config" in changed:
        return GoalDecision(Change.RECONFIGURE, goal, changed)
    if SCALE_OPTIONS.intersection(changed):
        return GoalDecision(Change.SCALE, goal, changed)
    if changed:
        return GoalDecision(Change.UPDATE, goal, changed)
    if failed:
        return GoalDecision(Change.RETRY, goal)
    if not (trusted and signed_now):
        return GoalDecision(Change.RESIGN, goal)
    return GoalDecision(Change.NOTHING, None)


def _differences(previous: Goal, proposal: Proposal) -> tuple[str, ...]:
    """The names of what ``proposal`` changes of ``previous``, sorted: options, the count,
    the version, the constructor arguments, the end of a canary (compared as JSON data: 1 and 1.0 are the same,
    tuples are lists)."""
    old, new = previous.options, proposal.options
    changed = {key for key in set(old) | set(new) if _plain(old.get(key)) != _plain(new.get(key))}
    for key, differs in (("num_replicas", previous.num_replicas != proposal.num_replicas),
                         ("version", previous.version != proposal.version),
                         ("init_sha", previous.init_sha != proposal.init_sha),
                         ("canary", previous.canary is not None)):
        if differs:
            changed.add(key)
    return tuple(sorted(changed))


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def with_canary(name: str, previous: Optional[Goal], canary: Canary) -> GoalDecision:
    """Start ``canary`` beside the running version of ``name``, move its split (same
    version and code), or replace a canary of another version. ``ValueError`` when there
    is nothing to run beside, the canary's version is the stable one, or its serializer
    differs.

    >>> stable = Goal(name="m", generation=1, version="1", spec_hash="s1", num_replicas=4, options={},
    ...               code_sha="c1", init_sha="i")
    >>> canary = Canary(version="2", spec_hash="s2", code_sha="c2", init_sha="i", options={}, traffic_percent=10)
    >>> started = with_canary("m", stable, canary)
    >>> started.change, started.goal.canary.traffic_percent
    (<Change.CANARY: 'canary'>, 10)
    >>> with_canary("m", started.goal, canary).change
    <Change.NOTHING: 'nothing to do'>
    """
    if previous is None or previous.deleting:
        raise ValueError(f"deployment {name!r} does not run yet, so a canary has nothing to run beside; "
                         "deploy it once without canary first")
    if previous.version == canary.version:
        raise ValueError(f"version {canary.version!r} of {name!r} already runs as its stable version; "
                         "a canary needs another version")
    serializer = canary.options.get("serializer", "json")
    if serializer != previous.options.get("serializer", "json"):
        raise ValueError(f"the canary's serializer {serializer!r} differs from the running "
                         f"version's {previous.options.get('serializer', 'json')!r}; callers send both the same "
                         "messages, so keep the serializer (change it with a rolling update)")
    running = previous.canary
    if running is not None and (running.version, running.spec_hash) == (canary.version, canary.spec_hash):
        canary = replace(running, traffic_percent=canary.traffic_percent, min_requests=canary.min_requests,
                         max_error_rate_increase=canary.max_error_rate_increase, max_p95_ratio=canary.max_p95_ratio)
    if canary == running:
        return GoalDecision(Change.NOTHING, None)
    return GoalDecision(Change.CANARY, replace(previous, canary=canary), ("canary",))


def without_canary(current: Goal) -> GoalDecision:
    """``current`` with its canary ended (aborted): the stable version stays."""
    return next_goal(current, proposal_of(current))
