"""Unit tests of the pure autoscaler (taskserve/autoscaler.py).

Tables for the rules, synthetic traces (burst, ramp, steady, idle, oscillation) run
through a controller-like loop, and hypothesis properties: the target stays within
``[min_replicas, max_replicas]``, never reverses direction within the delay of the new
direction, scales to zero when idle and wakes from zero at once, grows with the load,
and is deterministic without touching its inputs.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from typing import Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from taskserve.autoscaler import (
    Decision,
    LoadSample,
    ReplicaLoad,
    choose_replicas_to_remove,
    decide,
    direction,
    sample_interval,
    trim_history,
    wanted_replicas,
)
from taskserve.planner import StopReplica, plan
from taskserve.spec import AutoscalingConfig, validate_options
from taskserve.state import DeploymentHealth, Goal, Replica, ReplicaState

from .helpers import examples

PROPERTY = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIM = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def config(min_replicas: int = 1, max_replicas: int = 10, target: float = 2,
           up: float = 3, down: float = 60) -> AutoscalingConfig:
    return AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target,
                             upscale_delay_s=up, downscale_delay_s=down)


def trace(loads: Sequence[int], step: float = 1.0, start: float = 0.0) -> list[LoadSample]:
    """One sample per ``step`` seconds, the load all waiting."""
    return [LoadSample(at=start + index * step, waiting=load, serving=0) for index, load in enumerate(loads)]


def simulate(cfg: AutoscalingConfig, samples: Sequence[LoadSample], current: int) -> list[tuple[float, int, int]]:
    """Run the controller's loop: on each sample, trim the history and decide.

    Returns every change as ``(at, old target, new target)``.
    """
    history: tuple[LoadSample, ...] = ()
    changes = []
    for sample in samples:
        history = trim_history(cfg, (*history, sample), sample.at)
        decision = decide(cfg, current, history, sample.at)
        if decision.target != current:
            changes.append((sample.at, current, decision.target))
            current = decision.target
    return changes


def targets(cfg: AutoscalingConfig, samples: Sequence[LoadSample], current: int) -> list[int]:
    """The target after each sample of the loop above."""
    history: tuple[LoadSample, ...] = ()
    result = []
    for sample in samples:
        history = trim_history(cfg, (*history, sample), sample.at)
        current = decide(cfg, current, history, sample.at).target
        result.append(current)
    return result


# --------------------------------------------------------------------------- wanted


@pytest.mark.parametrize(
    "cfg, load, wanted",
    [
        (config(0, 10, 2), 0, 0),
        (config(0, 10, 2), 1, 1),
        (config(0, 10, 2), 2, 1),
        (config(0, 10, 2), 3, 2),
        (config(0, 10, 5), 14, 3),
        (config(1, 10, 2), 0, 1),            # min_replicas
        (config(0, 10, 2), 1000, 10),        # max_replicas
        (config(0, 100, 0.1), 3, 30),        # no float rounding up to 31
        (config(0, 100, 2.5), 5, 2),
        (config(0, 100, 2.5), 6, 3),
        (config(3, 5, 1), 4, 4),
    ],
)
def test_wanted_is_load_over_target_rounded_up_within_the_bounds(cfg, load, wanted):
    assert wanted_replicas(cfg, load) == wanted


def test_load_is_waiting_plus_serving():
    assert LoadSample(at=0, waiting=9, serving=5).load == 14
    assert decide(config(target=5), 1, [LoadSample(0, 9, 5), LoadSample(3, 9, 5)], 3).target == 3


# --------------------------------------------------------------------------- decide: table


DEFAULT = config()          # 1..10, target 2, up 3 s, down 60 s
ZERO = config(min_replicas=0)

DECISIONS = [
    # (case, config, current, loads one a second from t=0, now, target)
    ("steady at the current count stays", DEFAULT, 3, [6] * 100, 99, 3),
    ("steady from the start: no upscale before the window is covered", DEFAULT, 1, [6, 6, 6], 2, 1),
    ("a need held for the upscale delay scales up", DEFAULT, 1, [6, 6, 6, 6], 3, 3),
    ("a burst shorter than the upscale delay does nothing", DEFAULT, 2, [4] * 10 + [20, 20] + [4] * 5, 16, 2),
    ("a burst still rising: up to the least wanted over the window", DEFAULT, 2, [4] * 10 + [8, 12, 16, 20], 13, 4),
    ("a ramp: up to the least wanted over the window, not the peak", DEFAULT, 1, [2, 4, 6, 8, 10, 12, 14], 6, 4),
    ("up is capped at max_replicas", DEFAULT, 3, [500] * 5, 4, 10),
    ("at max_replicas, more load changes nothing", DEFAULT, 10, [500] * 5, 4, 10),
    ("a drop shorter than the downscale delay does nothing", DEFAULT, 5, [10] * 10 + [2] * 59, 68, 5),
    ("a drop held for the downscale delay scales down", DEFAULT, 5, [10] * 10 + [2] * 61, 70, 1),
    ("down to the most wanted over the window", DEFAULT, 5, [10] * 10 + [2] * 30 + [6] * 31, 70, 3),
    ("down is floored at min_replicas", config(min_replicas=2), 5, [0] * 100, 99, 2),
    ("idle for the downscale delay with min 0: zero", ZERO, 3, [6] * 5 + [0] * 61, 65, 0),
    ("idle a second short of the downscale delay: not yet", ZERO, 3, [6] * 5 + [0] * 60, 64, 3),
    ("at zero without load stays at zero", ZERO, 0, [0] * 100, 99, 0),
    ("wake from zero on the first waiting request", ZERO, 0, [0] * 100 + [1], 100, 1),
    ("wake from zero as many as the load says", ZERO, 0, [0] * 100 + [7], 100, 4),
    ("wake from zero is capped at max_replicas", ZERO, 0, [0] * 10 + [100], 10, 10),
    ("current below min_replicas (a changed config): min at once", config(min_replicas=3), 1, [0] * 5, 4, 3),
    ("current above max_replicas (a changed config): max at once", config(max_replicas=4), 9, [100] * 5, 4, 4),
    ("upscale delay 0 scales up on the latest sample", config(up=0), 1, [0, 0, 10], 2, 5),
    ("downscale delay 0 scales down on the latest sample", config(down=0), 5, [10, 10, 2], 2, 1),
]


@pytest.mark.parametrize("case, cfg, current, loads, now, target", DECISIONS, ids=[d[0] for d in DECISIONS])
def test_decision_table(case, cfg, current, loads, now, target):
    assert decide(cfg, current, trace(loads), now).target == target


def test_no_history_keeps_the_current_count_within_the_bounds():
    assert decide(DEFAULT, 4, [], 100.0) == Decision(4, "4 replicas; no load measured yet")
    assert decide(DEFAULT, 0, [], 100.0) == Decision(1, "1 replica; no load measured yet")
    assert decide(config(max_replicas=3), 7, [], 100.0).target == 3


def test_a_sample_holds_until_the_next_one():
    # One sample 100 s ago covers every window since: the need held that long.
    samples = [LoadSample(at=0.0, waiting=20, serving=0)]
    assert decide(DEFAULT, 1, samples, 100.0).target == 10
    assert decide(ZERO, 8, [LoadSample(at=0.0, waiting=0, serving=0)], 100.0).target == 0


def test_samples_after_now_are_not_used_yet():
    samples = trace([0] * 10) + [LoadSample(at=50.0, waiting=100, serving=0)]
    assert decide(ZERO, 0, samples, 9.0).target == 0
    assert decide(ZERO, 0, samples, 50.0).target == 10


def test_history_order_does_not_matter():
    samples = trace([2, 4, 6, 8, 10, 12, 14])
    shuffled = samples[:]
    random.Random(7).shuffle(shuffled)
    assert decide(DEFAULT, 1, shuffled, 6) == decide(DEFAULT, 1, samples, 6)


def test_wake_counts_serving_requests_too():
    # Replicas still draining serve requests while the target is zero: that is load.
    assert decide(ZERO, 0, [LoadSample(at=0.0, waiting=0, serving=3)], 0.0).target == 2


# --------------------------------------------------------------------------- reasons


@pytest.mark.parametrize(
    "cfg, current, samples, now, reason",
    [
        (config(target=5), 1, trace([14] * 4), 3, "3 replicas for 14 waiting/serving, target 5 each"),
        (config(target=5), 3, trace([5] * 4), 3, "3 replicas for 5 waiting/serving, target 5 each; "
                                                  "1 wanted, scaling down if that holds for 60 s"),
        (DEFAULT, 1, trace([1, 9]), 1, "1 replica for 9 waiting/serving, target 2 each; "
                                       "5 wanted, scaling up if that holds for 3 s"),
        (config(target=2.5, up=1.5), 1, trace([10, 10, 10]), 2, "4 replicas for 10 waiting/serving, target 2.5 each"),
        (DEFAULT, 10, trace([500] * 4), 3, "10 replicas for 500 waiting/serving, target 2 each; max_replicas is 10"),
        (config(min_replicas=2), 2, trace([0] * 4), 3, "2 replicas for 0 waiting/serving, target 2 each; "
                                                        "min_replicas is 2"),
        (ZERO, 0, trace([0, 3]), 1, "2 replicas for 3 waiting/serving, target 2 each; woken from zero"),
        (ZERO, 1, trace([0] * 61), 60, "0 replicas for 0 waiting/serving, target 2 each"),
    ],
)
def test_reason_is_one_line_saying_the_count_the_load_and_what_holds_it(cfg, current, samples, now, reason):
    assert decide(cfg, current, samples, now).reason == reason


# --------------------------------------------------------------------------- traces through the loop


def test_trace_steady_never_changes():
    assert simulate(DEFAULT, trace([6] * 300), current=3) == []


def test_trace_burst_scales_up_after_the_delay_then_down_after_the_other():
    loads = [2] * 10 + [20] * 10 + [2] * 100
    changes = simulate(DEFAULT, trace(loads), current=1)
    assert changes == [(13.0, 1, 10), (80.0, 10, 1)]


def test_trace_short_bursts_start_nothing():
    loads = ([2] * 7 + [30, 30]) * 20       # 2 s spikes, shorter than the 3 s upscale delay
    assert simulate(DEFAULT, trace(loads), current=1) == []


def test_trace_ramp_follows_the_load_up_one_window_behind():
    loads = list(range(0, 41, 2))            # 0, 2, ... 40 over 20 s: wants 1..10
    wanted = targets(DEFAULT, trace(loads), current=1)
    assert wanted == sorted(wanted)          # only up on a ramp
    assert wanted[12] == 9                   # at t=12, the least wanted since t=9 (18 requests)
    assert wanted[-1] == 10                  # max_replicas
    for index, target in enumerate(wanted):
        assert target <= wanted_replicas(DEFAULT, loads[index])     # never above the latest need


def test_trace_idle_scales_to_zero_and_wakes_at_once():
    loads = [6] * 10 + [0] * 70 + [1] + [0] * 5
    changes = simulate(ZERO, trace(loads), current=3)
    assert changes == [(70.0, 3, 0), (80.0, 0, 1)]


def test_trace_oscillation_around_a_threshold_does_not_flap():
    # 4 and 5 requests want 2 and 3 replicas; the load crosses the line every 2 s.
    loads = ([4, 4, 5, 5]) * 50
    assert simulate(DEFAULT, trace(loads), current=2) == []
    # A slower oscillation (10 s each side) goes up once and never back within 60 s.
    loads = ([4] * 10 + [5] * 10) * 10
    assert simulate(DEFAULT, trace(loads), current=2) == [(13.0, 2, 3)]


def test_trace_sparse_samples_still_move():
    # Samples 10 s apart: each holds until the next, so at t=20 the need of t=10 has held 10 s.
    changes = simulate(DEFAULT, trace([2, 8, 8], step=10.0), current=1)
    assert changes == [(20.0, 1, 4)]


# --------------------------------------------------------------------------- trim_history


def test_trim_keeps_the_sample_in_effect_at_the_longest_delay():
    samples = trace([1] * 100)
    kept = trim_history(DEFAULT, samples, 99.0)
    assert [s.at for s in kept] == [float(t) for t in range(39, 100)]


def test_trim_keeps_everything_younger_than_the_window_and_sorts():
    samples = list(reversed(trace([1] * 5)))
    assert [s.at for s in trim_history(DEFAULT, samples, 4.0)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert trim_history(DEFAULT, [], 4.0) == ()


# --------------------------------------------------------------------------- properties


@st.composite
def configs(draw) -> AutoscalingConfig:
    low = draw(st.integers(0, 5))
    return AutoscalingConfig(
        min_replicas=low,
        max_replicas=draw(st.integers(max(1, low), 12)),
        target_ongoing_requests=draw(st.sampled_from([1, 2, 2.5, 5, 0.5])),
        upscale_delay_s=draw(st.sampled_from([0, 1, 3, 5.5])),
        downscale_delay_s=draw(st.sampled_from([0, 2, 10, 60])),
    )


@st.composite
def histories(draw, max_size: int = 40) -> list[LoadSample]:
    """Samples at increasing times (steps of 0.5 s to 15 s), loads up to 40."""
    steps = draw(st.lists(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0, 15.0]), min_size=1, max_size=max_size))
    at = 0.0
    samples = []
    for step in steps:
        at += step
        samples.append(LoadSample(at=at, waiting=draw(st.integers(0, 30)), serving=draw(st.integers(0, 10))))
    return samples


@given(configs(), st.integers(0, 20), histories(), st.floats(0, 200))
@PROPERTY
def test_property_target_is_always_within_the_bounds(cfg, current, history, now):
    target = decide(cfg, current, history, now).target
    assert cfg.min_replicas <= target <= cfg.max_replicas


def _reversals(cfg: AutoscalingConfig, changes: list[tuple[float, int, int]]) -> list[str]:
    """Direction changes that came sooner than the new direction's delay (a wake from zero aside)."""
    bad = []
    for (t1, old1, new1), (t2, old2, new2) in zip(changes, changes[1:]):
        up1, up2 = new1 > old1, new2 > old2
        if up1 == up2 or (up2 and old2 == 0):
            continue
        delay = cfg.upscale_delay_s if up2 else cfg.downscale_delay_s
        if t2 - t1 < delay:
            bad.append(f"{old1}->{new1} at {t1}, then {old2}->{new2} at {t2} (delay {delay})")
    return bad


@st.composite
def phased_traces(draw) -> list[LoadSample]:
    """Phases of a steady, noisy load (bursts, lulls, plateaus) sampled at uneven steps."""
    samples = []
    at = 0.0
    for _ in range(draw(st.integers(1, 8))):
        level = draw(st.integers(0, 30))
        for _ in range(draw(st.integers(1, 40))):
            at += draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 7.0]))
            samples.append(LoadSample(at=at, waiting=max(0, level + draw(st.integers(-3, 3))), serving=0))
    return samples


@st.composite
def timed_phases(draw) -> tuple[AutoscalingConfig, list[LoadSample]]:
    """A config and phases lasting about one of its delays, sampled every 0.5 s: the
    timings where a scale in one direction is closest to one in the other."""
    cfg = draw(configs())
    samples = []
    at = 0.0
    for _ in range(draw(st.integers(2, 8))):
        level = draw(st.integers(0, 30))
        delay = draw(st.sampled_from([cfg.upscale_delay_s, cfg.downscale_delay_s]))
        duration = delay * draw(st.sampled_from([0.5, 0.9, 1.0, 1.1, 1.5])) + draw(st.sampled_from([0, 0.5, 1.0]))
        for _ in range(int(duration / 0.5) + 1):
            at += 0.5
            samples.append(LoadSample(at=at, waiting=level, serving=0))
    return cfg, samples


@given(st.one_of(st.tuples(configs(), histories(max_size=120)), st.tuples(configs(), phased_traces()),
                 timed_phases()),
       st.integers(0, 12))
@SIM
def test_property_never_reverses_direction_within_the_delay(scenario, start):
    cfg, history = scenario
    start = min(max(start, cfg.min_replicas), cfg.max_replicas)
    changes = simulate(cfg, history, start)
    assert _reversals(cfg, changes) == []


@given(configs(), st.lists(st.integers(0, 1), min_size=10, max_size=150), st.integers(1, 8),
       st.sampled_from([0.5, 1.0]))
@SIM
def test_property_no_flapping_on_a_load_oscillating_around_a_threshold(cfg, pattern, level, step):
    # The load hops between the two sides of a step of the wanted count.
    edge = int(level * cfg.target_ongoing_requests)
    loads = [edge + bit for bit in pattern]
    changes = simulate(cfg, trace(loads, step=step), cfg.min_replicas)
    assert _reversals(cfg, changes) == []


@given(configs(), histories(), st.integers(1, 12), st.floats(0, 100))
@PROPERTY
def test_property_idle_for_the_downscale_delay_with_min_zero_is_zero(cfg, before, current, idle_for):
    cfg = replace(cfg, min_replicas=0)
    last = before[-1].at
    idle = [LoadSample(last + 1, 0, 0), LoadSample(last + 1 + idle_for, 0, 0)]
    now = last + 1 + idle_for
    target = decide(cfg, current, before + idle, now).target
    if idle_for >= cfg.downscale_delay_s:
        assert target == 0
    elif before[-1].load > 0:
        assert target >= 1      # not yet: the need just before the idle time is still in the window


@given(configs(), histories(), st.integers(1, 40))
@PROPERTY
def test_property_wakes_from_zero_at_once_on_the_first_waiting_request(cfg, before, waiting):
    cfg = replace(cfg, min_replicas=0)
    now = before[-1].at + 0.1
    decision = decide(cfg, 0, before + [LoadSample(now, waiting, 0)], now)
    assert decision.target == wanted_replicas(cfg, waiting) >= 1


@given(configs(), st.integers(0, 12), histories(), st.floats(0, 200), st.data())
@PROPERTY
def test_property_more_load_never_gives_fewer_replicas(cfg, current, history, now, data):
    more = [
        LoadSample(s.at, s.waiting + data.draw(st.integers(0, 20)), s.serving + data.draw(st.integers(0, 5)))
        for s in history
    ]
    assert decide(cfg, current, more, now).target >= decide(cfg, current, history, now).target


@given(configs(), st.integers(0, 12), histories(), st.floats(0, 200))
@PROPERTY
def test_property_a_move_goes_no_further_than_the_latest_need(cfg, current, history, now):
    # Up: the least wanted over the window; down: the most. Either way, not past the latest sample.
    assume(any(s.at <= now for s in history))
    latest = max((s for s in history if s.at <= now), key=lambda s: s.at)
    held = min(max(current, cfg.min_replicas), cfg.max_replicas)
    target = decide(cfg, current, history, now).target
    wanted = wanted_replicas(cfg, latest.load)
    if target > held:
        assert target <= wanted
    if target < held:
        assert target >= wanted


@given(configs(), st.integers(0, 12), histories(), st.floats(0, 200), st.randoms(use_true_random=False))
@PROPERTY
def test_property_deterministic_and_inputs_untouched(cfg, current, history, now, rng):
    before = copy.deepcopy(history)
    first = decide(cfg, current, history, now)
    assert history == before
    shuffled = history[:]
    rng.shuffle(shuffled)
    assert decide(cfg, current, tuple(shuffled), now) == first == decide(cfg, current, history, now)
    trim_history(cfg, history, now)
    assert history == before


@given(configs(), st.integers(0, 12), histories(), st.floats(0, 200), st.floats(0, 100))
@PROPERTY
def test_property_trimmed_history_decides_the_same_now_and_later(cfg, current, history, now, later):
    trimmed = trim_history(cfg, history, now)
    for moment in (now, now + later):
        assert decide(cfg, current, trimmed, moment) == decide(cfg, current, history, moment)


# --------------------------------------------------------------------------- choose_replicas_to_remove


def test_scale_down_victims_in_order():
    replicas = [
        ReplicaLoad("busy-3", ReplicaState.RUNNING, in_flight=3),
        ReplicaLoad("idle-old", ReplicaState.RUNNING, created_at=1.0),
        ReplicaLoad("idle-new", ReplicaState.RUNNING, created_at=5.0),
        ReplicaLoad("busy-1", ReplicaState.RUNNING, in_flight=1),
        ReplicaLoad("starting", ReplicaState.STARTING),
        ReplicaLoad("unplaced", ReplicaState.PENDING, placed=False),
        ReplicaLoad("building-env", ReplicaState.PENDING),
        ReplicaLoad("reconfiguring", ReplicaState.RECONFIGURING),
        ReplicaLoad("draining", ReplicaState.DRAINING, in_flight=1),
        ReplicaLoad("stopped", ReplicaState.STOPPED),
        ReplicaLoad("failed", ReplicaState.FAILED),
    ]
    assert choose_replicas_to_remove(replicas, 100) == (
        "failed", "stopped", "draining",
        "unplaced", "building-env", "starting", "reconfiguring", "idle-new", "idle-old", "busy-1", "busy-3",
    )
    assert choose_replicas_to_remove(replicas[:8], 2) == ("unplaced", "building-env")
    assert choose_replicas_to_remove(replicas, 0) == ()
    assert choose_replicas_to_remove(replicas, -1) == ()
    assert choose_replicas_to_remove([], 3) == ()


def test_scale_down_victim_from_a_replica_record():
    record = Replica("m-1", "m", "s", "v1", node_id="node-a", state=ReplicaState.RUNNING, created_at=3.0)
    assert ReplicaLoad.of(record, in_flight=2) == ReplicaLoad("m-1", ReplicaState.RUNNING, 2, True, 3.0)


def _tier(replica: ReplicaLoad) -> tuple:
    """The order the brief asks for, written out independently."""
    if replica.state in (ReplicaState.DRAINING, ReplicaState.STOPPED, ReplicaState.FAILED):
        return (-1, 0)
    if replica.in_flight:
        return (3, replica.in_flight)
    if not replica.placed:
        return (0, 0)
    if replica.state == ReplicaState.RUNNING:
        return (2, 0)
    return (1, 0)


REPLICAS = st.lists(
    st.builds(
        ReplicaLoad,
        replica_id=st.text(alphabet="abcdef0123", min_size=1, max_size=6),
        state=st.sampled_from(list(ReplicaState)),
        in_flight=st.integers(0, 4),
        placed=st.booleans(),
        created_at=st.floats(0, 100),
    ),
    max_size=15,
    unique_by=lambda replica: replica.replica_id,
)


@given(REPLICAS, st.integers(0, 20), st.randoms(use_true_random=False))
@PROPERTY
def test_property_scale_down_removes_starting_and_idle_before_busy(replicas, count, rng):
    before = copy.deepcopy(replicas)
    chosen = choose_replicas_to_remove(replicas, count)
    assert replicas == before
    candidates = {r.replica_id: r for r in replicas}
    assert len(chosen) == min(count, len(candidates)) == len(set(chosen))
    assert set(chosen) <= set(candidates)
    for earlier, later in zip(chosen, chosen[1:]):
        assert _tier(candidates[earlier]) <= _tier(candidates[later])
    for kept in set(candidates) - set(chosen):
        for gone in chosen:
            assert _tier(candidates[gone]) <= _tier(candidates[kept])
    shuffled = replicas[:]
    rng.shuffle(shuffled)
    assert choose_replicas_to_remove(shuffled, count) == chosen


def _running(replica_id: str, created_at: float, in_flight: int) -> Replica:
    return Replica(replica_id, "m", "s1", "v1", node_id="node-a", state=ReplicaState.RUNNING,
                   created_at=created_at, in_flight=in_flight)


@pytest.mark.parametrize("busy_is_newest", [True, False])
def test_a_scale_down_plan_stops_the_idle_replica_and_keeps_the_busy_one(busy_is_newest):
    busy = _running("busy", created_at=2.0 if busy_is_newest else 1.0, in_flight=1)
    idle = _running("idle", created_at=1.0 if busy_is_newest else 2.0, in_flight=0)
    goal = Goal(name="m", generation=2, version="v1", spec_hash="s1", num_replicas=1, options={},
                code_sha="c", init_sha="i")
    result = plan(goal, [busy, idle], [], DeploymentHealth(), 0.0, new_id=lambda: "m-new", dead_nodes=set())
    assert [a.replica_id for a in result.actions if isinstance(a, StopReplica)] == ["idle"]


def test_a_scale_down_plan_stops_the_replica_holding_fewer_requests():
    replicas = [_running("three", 3.0, 3), _running("one", 1.0, 1), _running("two", 2.0, 2)]
    goal = Goal(name="m", generation=2, version="v1", spec_hash="s1", num_replicas=1, options={},
                code_sha="c", init_sha="i")
    result = plan(goal, replicas, [], DeploymentHealth(), 0.0, new_id=lambda: "m-new", dead_nodes=set())
    assert [a.replica_id for a in result.actions if isinstance(a, StopReplica)] == ["one", "two"]


# --------------------------------------------------------------------------- sampling between passes


def test_the_sample_interval_is_a_quarter_of_the_upscale_delay_at_least_a_tenth_of_a_second():
    assert sample_interval(config(up=0.5)) == 0.125
    assert sample_interval(config(up=3)) == 0.75
    assert sample_interval(config(up=0)) == 0.1
    assert sample_interval(config(up=0.2)) == 0.1


@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 40), st.integers(0, 5), st.integers(1, 4))
@PROPERTY
def test_property_direction_is_where_decide_goes_without_delays(low, extra, load, above_low, target):
    cfg = config(min_replicas=low, max_replicas=max(1, low + extra), target=target, up=0, down=0)
    current = min(low + above_low, cfg.max_replicas)
    moved = decide(cfg, current, [LoadSample(0.0, load, 0)], 0.0).target
    assert direction(cfg, current, load) == (moved > current) - (moved < current)


def test_decide_takes_the_autoscaling_config_of_the_options():
    options = validate_options({"num_replicas": "auto"})
    assert decide(options.autoscaling_config, options.num_replicas, trace([9] * 4), 3).target == 5
