"""Unit tests of the pure goal decisions (taskserve/goals.py): SPEC §2's update table
row by row, the helpers that propose one change of a goal (scale, reconfigure, restart,
rollback, promote, canary), and properties over random options: a same-version
identical deploy is always nothing to do, an unversioned one always rolls, a change of
the count alone never replaces a replica. Also: goals of the old layout (the count in
the options too) still read.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskserve.goals import (
    Change,
    Proposal,
    goal_options,
    next_goal,
    promoted,
    proposal_of,
    propose,
    reconfigured,
    restarted,
    rolled_back,
    scaled,
    with_canary,
    without_canary,
)
from taskserve.spec import validate_options
from taskserve.state import Canary, Goal

from .helpers import examples

NAME = "model"
PROPERTY = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])

_versions = itertools.count()


def proposal(options: Optional[dict[str, Any]] = None, *, init: str = "i1", code: str = "c-new") -> Proposal:
    """A deploy of ``options`` (validated as deploy() does); a missing version is generated."""
    return propose(NAME, validate_options({"name": NAME, **(options or {})}), code_sha=code, init_sha=init,
                   has_reconfigure=True, new_version=lambda: f"generated-{next(_versions)}")


def running(options: Optional[dict[str, Any]] = None, *, init: str = "i1", **fields: Any) -> Goal:
    """The goal a first deploy of ``options`` wrote (generation 3), running code "c-old"."""
    goal = next_goal(None, proposal(options, init=init, code="c-old")).goal
    assert goal is not None
    return replace(goal, generation=3, **fields)


BASE = {"version": "1", "num_replicas": 2, "user_config": {"threshold": 1}}


# ------------------------------------------------------------------ SPEC §2, row by row


@pytest.mark.parametrize("previous, options, facts, change, changed", [
    # no previous goal, or one being deleted: a first deploy
    (None, BASE, {}, Change.FIRST, ()),
    (running(BASE, deleting=True), BASE, {}, Change.FIRST, ()),
    # deploy() with version=None: a rolling redeploy, even if nothing changed
    (running({**BASE, "version": None}), {**BASE, "version": None}, {}, Change.ROLL, ("version",)),
    (running(BASE), {**BASE, "version": None}, {}, Change.ROLL, ("version",)),
    # same version, nothing else changed: nothing to do
    (running(BASE), BASE, {}, Change.NOTHING, ()),
    # same version, num_replicas changed: scale only
    (running(BASE), {**BASE, "num_replicas": 5}, {}, Change.SCALE, ("num_replicas",)),
    (running(BASE), {**BASE, "num_replicas": 0}, {}, Change.SCALE, ("num_replicas",)),
    (running(BASE), {**BASE, "num_replicas": "auto"}, {}, Change.SCALE, ("autoscaling_config", "num_replicas")),
    # same version, user_config changed: reconfigure in place
    (running(BASE), {**BASE, "user_config": {"threshold": 2}}, {}, Change.RECONFIGURE, ("user_config",)),
    (running(BASE), {**BASE, "user_config": {"threshold": 2}, "num_replicas": 3}, {}, Change.RECONFIGURE,
     ("num_replicas", "user_config")),
    # a new version, or the same with other resources, runtime_env or init args: rolling update
    (running(BASE), {**BASE, "version": "2"}, {}, Change.ROLL, ("version",)),
    (running(BASE), {**BASE, "num_cpus": 2}, {}, Change.ROLL, ("num_cpus",)),
    (running(BASE), {**BASE, "num_gpus": 1}, {}, Change.ROLL, ("num_gpus",)),
    (running(BASE), {**BASE, "memory": 2**30}, {}, Change.ROLL, ("memory",)),
    (running(BASE), {**BASE, "runtime_env": {"env_vars": {"MODE": "fast"}}}, {}, Change.ROLL, ("runtime_env",)),
    (running(BASE, init="i0"), BASE, {}, Change.ROLL, ("init_sha",)),
    (running(BASE), {**BASE, "serializer": "pickle"}, {}, Change.ROLL, ("serializer",)),
    (running(BASE), {**BASE, "max_concurrent_queries": 4}, {}, Change.ROLL, ("max_concurrent_queries",)),
    # same version, options a replica needs no restart for: in place
    (running(BASE), {**BASE, "request_timeout_s": 5}, {}, Change.UPDATE, ("request_timeout_s",)),
    (running(BASE), {**BASE, "route_prefix": "/v1/model"}, {}, Change.UPDATE, ("route_prefix",)),
    (running(BASE), {**BASE, "max_unavailable": 1}, {}, Change.UPDATE, ("max_unavailable",)),
    # same version and options, but the previous goal failed: tried again
    (running(BASE), BASE, {"failed": True}, Change.RETRY, ()),
    # ... or its code cannot be trusted, or it is not sealed with the signing secret: written again
    (running(BASE), BASE, {"trusted": False}, Change.RESIGN, ()),
    (running(BASE), BASE, {"signed_now": False}, Change.RESIGN, ()),
    # deploying the stable version again ends its canary
    (running(BASE, canary=Canary("2", "s2", "c2", "i1", {}, traffic_percent=10)), BASE, {}, Change.UPDATE,
     ("canary",)),
    # the same data as JSON gives it back: nothing changed
    (running({**BASE, "user_config": {"t": [1, 2]}}), {**BASE, "user_config": {"t": (1, 2)}}, {}, Change.NOTHING, ()),
    (running({**BASE, "num_cpus": 1}), {**BASE, "num_cpus": 1.0}, {}, Change.NOTHING, ()),
])
def test_spec_update_table(previous, options, facts, change, changed):
    decision = next_goal(previous, proposal(options), **facts)
    assert decision.change == change
    assert decision.changed == changed
    assert (decision.goal is None) == (change == Change.NOTHING)


def test_a_roll_runs_the_new_code_and_replaces_every_replica():
    previous = running({**BASE, "version": "1"}, restart_nonce="r1")
    goal = next_goal(previous, proposal({**BASE, "version": "2"})).goal
    assert goal.code_sha == "c-new" and goal.restart_nonce == "" and goal.version == "2"
    assert goal.replica_spec != previous.replica_spec


@pytest.mark.parametrize("options, facts", [
    ({**BASE, "num_replicas": 5}, {}),
    ({**BASE, "user_config": {"threshold": 9}}, {}),
    ({**BASE, "request_timeout_s": 9}, {}),
    (BASE, {"failed": True}),
    (BASE, {"signed_now": False}),
])
def test_in_place_changes_keep_the_code_that_runs_and_every_replica(options, facts):
    previous = running(BASE, restart_nonce="r1")
    goal = next_goal(previous, proposal(options), **facts).goal
    assert goal.code_sha == "c-old", "a scale-up runs what the other replicas run"
    assert goal.replica_spec == previous.replica_spec


def test_code_that_cannot_be_trusted_is_not_run_again():
    goal = next_goal(running(BASE), proposal({**BASE, "num_replicas": 4}), trusted=False).goal
    assert goal.code_sha == "c-new"


def test_the_count_lives_in_the_goal_alone():
    goal = next_goal(None, proposal({**BASE, "num_replicas": 4})).goal
    assert goal.num_replicas == 4 and "num_replicas" not in goal.options and "canary" not in goal.options
    assert "num_replicas" not in json.loads(goal.to_json())["options"]


def test_a_decision_carries_no_signature_and_no_generation():
    goal = next_goal(running(BASE, user_config_signature="mac"), proposal({**BASE, "num_replicas": 3})).goal
    assert (goal.generation, goal.user_config_signature, goal.created_at) == (0, "", 0.0)


# ------------------------------------------------------------------ one change of a goal


def test_scale_reconfigure_restart_propose_one_change():
    previous = running(BASE, restart_nonce="r1")
    assert next_goal(previous, scaled(previous, 2)).change == Change.NOTHING
    decision = next_goal(previous, scaled(previous, 7))
    assert decision.change == Change.SCALE and decision.goal.num_replicas == 7
    decision = next_goal(previous, reconfigured(previous, {"threshold": (3, 4)}))
    assert decision.change == Change.RECONFIGURE and decision.goal.options["user_config"] == {"threshold": [3, 4]}
    assert next_goal(previous, reconfigured(previous, {"threshold": 1})).change == Change.NOTHING
    decision = next_goal(previous, restarted(previous, "r2"))
    assert decision.change == Change.RESTART and decision.goal.replica_spec != previous.replica_spec
    assert decision.goal.code_sha == previous.code_sha


def test_rollback_takes_the_old_version_with_the_current_count_and_autoscaling():
    then = running({**BASE, "version": "1", "num_replicas": 1})
    now = next_goal(then, proposal({**BASE, "version": "2", "num_replicas": "auto"})).goal
    now = replace(now, generation=5, num_replicas=6)
    decision = next_goal(now, rolled_back(now, then), trusted=False)
    assert decision.change == Change.ROLL
    goal = decision.goal
    assert (goal.version, goal.code_sha, goal.num_replicas) == ("1", then.code_sha, 6)
    assert goal.options["autoscaling_config"] == now.options["autoscaling_config"]
    # A config rolled back in place: the same replicas, the old config.
    reconfigured_goal = replace(next_goal(then, reconfigured(then, {"threshold": 2})).goal, generation=4)
    decision = next_goal(reconfigured_goal, rolled_back(reconfigured_goal, then), trusted=False)
    assert decision.change == Change.RECONFIGURE and decision.goal.options["user_config"] == {"threshold": 1}
    assert decision.goal.replica_spec == reconfigured_goal.replica_spec


def test_canary_start_move_abort_promote():
    stable = running(BASE)
    canary = Canary("2", "s2", "c2", "i1", goal_options(validate_options({**BASE, "version": "2"})),
                    traffic_percent=10.0, kind="class", has_reconfigure=True)
    started = with_canary(NAME, stable, canary)
    assert started.change == Change.CANARY and started.goal.canary == canary
    assert started.goal.replica_spec == stable.replica_spec
    assert with_canary(NAME, started.goal, canary).change == Change.NOTHING
    moved = with_canary(NAME, started.goal, replace(canary, traffic_percent=50.0, baseline={"other": 1}))
    assert moved.goal.canary.traffic_percent == 50.0 and moved.goal.canary.baseline == {}, "the split moves only"
    aborted = without_canary(started.goal)
    assert aborted.change == Change.UPDATE and aborted.goal.canary is None
    assert aborted.goal.replica_spec == stable.replica_spec
    promotion = next_goal(started.goal, promoted(started.goal))
    assert promotion.change == Change.ROLL and promotion.goal.canary is None
    assert (promotion.goal.version, promotion.goal.code_sha, promotion.goal.num_replicas) == ("2", "c2", 2)


@pytest.mark.parametrize("previous, canary, message", [
    (None, Canary("2", "s2", "c2", "i", {}, traffic_percent=10), "does not run yet"),
    (running(BASE), Canary("1", "s2", "c2", "i", {}, traffic_percent=10), "already runs as its stable version"),
    (running(BASE), Canary("2", "s2", "c2", "i", {"serializer": "pickle"}, traffic_percent=10), "serializer"),
])
def test_a_canary_that_cannot_start_says_why(previous, canary, message):
    with pytest.raises(ValueError, match=message):
        with_canary(NAME, previous, canary)
    with pytest.raises(ValueError, match="runs no canary"):
        promoted(running(BASE))


# ------------------------------------------------------------------ properties

json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                       max_size=3),
                           max_leaves=6)
options_strategy = st.fixed_dictionaries({}, optional={
    "num_replicas": st.integers(0, 50),
    "user_config": json_values,
    "num_cpus": st.sampled_from([0, 0.5, 1, 2]),
    "request_timeout_s": st.sampled_from([1, 30, 60.5]),
    "max_concurrent_queries": st.integers(1, 8),
    "serializer": st.sampled_from(["json", "pickle"]),
    "route_prefix": st.sampled_from([None, False, "/x"]),
    "runtime_env": st.sampled_from([None, {"env_vars": {"A": "1"}}]),
})


@PROPERTY
@given(options=options_strategy, version=st.text(min_size=1, max_size=5))
def test_a_same_version_identical_deploy_is_always_nothing_to_do(options, version):
    options = {**options, "version": version}
    assert next_goal(running(options), proposal(options)).change == Change.NOTHING


@PROPERTY
@given(before=options_strategy, after=options_strategy)
def test_an_unversioned_deploy_always_rolls_every_replica(before, after):
    previous = running(before)
    decision = next_goal(previous, proposal({**after, "version": None}))
    assert decision.change == Change.ROLL
    assert decision.goal.replica_spec != previous.replica_spec


@PROPERTY
@given(options=options_strategy, count=st.integers(0, 50), failed=st.booleans())
def test_a_new_count_alone_is_a_scale_that_replaces_no_replica(options, count, failed):
    options = {**options, "version": "v"}
    previous = running(options)
    decision = next_goal(previous, proposal({**options, "num_replicas": count}), failed=failed)
    if count == previous.num_replicas:
        assert decision.change == (Change.RETRY if failed else Change.NOTHING)
    else:
        assert decision.change == Change.SCALE and decision.goal.num_replicas == count
        assert decision.goal.replica_spec == previous.replica_spec and decision.goal.code_sha == previous.code_sha


@PROPERTY
@given(before=options_strategy, after=options_strategy)
def test_only_a_roll_or_a_restart_replaces_replicas(before, after):
    before, after = {**before, "version": "v"}, {**after, "version": "v"}
    previous = running(before)
    decision = next_goal(previous, proposal(after))
    if decision.goal is not None and decision.change not in (Change.ROLL, Change.RESTART):
        assert decision.goal.replica_spec == previous.replica_spec


# ------------------------------------------------------------------ the old layout


def test_goals_of_the_old_layout_still_read():
    """Goals written before the count lived in the goal alone kept it in the options
    too (the goal's own field was the one in force): they read the same."""
    old = {"name": NAME, "generation": 7, "version": "1", "spec_hash": "s", "num_replicas": 3,
           "options": {"num_replicas": 3, "num_cpus": 1, "user_config": None}, "code_sha": "c", "init_sha": "i",
           "canary": {"version": "2", "spec_hash": "s2", "code_sha": "c2", "init_sha": "i",
                      "options": {"num_replicas": 3, "num_cpus": 1}, "traffic_percent": 10}}
    goal = Goal.from_json(json.dumps(old))
    assert goal.num_replicas == 3 and goal.options == {"num_cpus": 1, "user_config": None}
    assert goal.canary.options == {"num_cpus": 1}
    assert goal.canary_goal().num_replicas == 1
    assert next_goal(goal, proposal_of(goal)).changed == ("canary",)
    stable = replace(goal, canary=None)
    assert next_goal(stable, proposal_of(stable)).change == Change.NOTHING
    assert next_goal(stable, scaled(stable, 5)).goal.num_replicas == 5
