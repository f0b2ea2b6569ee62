"""What the leading controller keeps of its autoscaled deployments between passes.

:class:`AutoscaleTracker` holds each autoscaled deployment's recent load samples and the
count in force, steps it once per pass with the pure :func:`taskserve.autoscaler.decide`,
and says what to look at between passes: the deployments whose queues are worth a look
(``watched``, every ``watch_s``), those asleep at zero, and when the next autoscaling
delay ends (``due``). It does no I/O: the controller reads the stored decision of a
deployment the tracker does not know yet, writes the decision a step returns, and only
then has the tracker keep it (:meth:`AutoscaleTracker.keep`), so a write that failed is
tried again next pass.

Example (a deployment at rest, then a backlog)::

    >>> config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=1,
    ...                            upscale_delay_s=0.5, downscale_delay_s=2)
    >>> goal = Goal(name="m", generation=1, version="v", spec_hash="s", num_replicas=1, code_sha="c",
    ...             init_sha="i", options={})
    >>> tracker = AutoscaleTracker(resync_s=1.0)
    >>> step = tracker.step(goal, config, (0, 0), now=1700000000.0, clock=10.0, stored=None)
    >>> step.target, step.write.target, step.change is None
    (1, 1, True)
    >>> tracker.keep(step)
    >>> step = tracker.step(goal, config, (6, 1), now=1700000000.2, clock=10.2, stored=None)
    >>> step.target, step.write.reason
    (1, '1 replica for 7 waiting/serving, target 1 each; 4 wanted, scaling up if that holds for 0.5 s')
    >>> tracker.keep(step)
    >>> tracker.end_pass(autoscaled={"m"}, unreadable=set())
    >>> tracker.due, tracker.watched
    (10.7, ('m',))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import AbstractSet, Mapping, Optional

from .autoscaler import LoadSample, decide, direction, sample_interval, trim_history, wanted_replicas
from .spec import AutoscalingConfig, check_autoscaling_config
from .state import AutoscaleState, Goal

# While an autoscaled deployment has no replica, how often its queue is looked at
# between passes (one pipelined LLEN), so that its first request wakes it at once.
WAKE_POLL_S = 0.1


@dataclass
class Scaling:
    """What the leading controller keeps of an autoscaled deployment between passes."""

    target: int                                    # the count in force (decide's ``current``)
    samples: tuple[LoadSample, ...] = ()           # recent load, trimmed to what decide uses
    written: Optional[AutoscaleState] = None       # what its key holds, as far as this controller knows
    due: Optional[float] = None                    # (clock) when a delay running now could end
    config: Optional[AutoscalingConfig] = None     # the config of the last decision


@dataclass(frozen=True)
class AutoscaleStep:
    """One pass's decision for one autoscaled deployment: the count to plan for, and what
    to record first (``write``, with its history line ``change`` when the count moved)."""

    name: str
    previous: int                        # the count in force before this pass
    target: int                          # the count to plan for
    write: Optional[AutoscaleState]      # None when the stored state says this already
    change: Optional[dict]               # the history line of a changed count, else None
    kept: Scaling                        # what the tracker keeps once it is written


def autoscaling_config(goal: Goal) -> Optional[AutoscalingConfig]:
    """The goal's ``autoscaling_config`` (a dict after the JSON round trip), or None.

    >>> goal = Goal(name="m", generation=1, version="v", spec_hash="s", num_replicas=1, code_sha="c",
    ...             init_sha="i", options={"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}})
    >>> autoscaling_config(goal).max_replicas
    4
    >>> autoscaling_config(replace(goal, options={})) is None
    True
    """
    return check_autoscaling_config(goal.options.get("autoscaling_config"))


def next_change_at(config: AutoscalingConfig, target: int, samples: tuple[LoadSample, ...]) -> Optional[float]:
    """When :func:`~taskserve.autoscaler.decide` would move ``target`` if the load stays as
    in the latest sample: the start of the run of samples that want more (or fewer)
    replicas, plus the delay of that direction. None when the latest wants ``target``.

    >>> config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=1,
    ...                            upscale_delay_s=0.5, downscale_delay_s=2)
    >>> rising = (LoadSample(10.0, 0, 1), LoadSample(11.0, 3, 1), LoadSample(12.0, 5, 1))
    >>> next_change_at(config, 1, rising)               # more than 1 wanted since 11.0
    11.5
    >>> next_change_at(config, 4, rising) is None       # 4 wanted now: nothing would move
    True
    >>> next_change_at(config, 4, (LoadSample(10.0, 1, 0), LoadSample(11.0, 0, 2)))   # fewer since 10.0
    12.0
    """
    if not samples:
        return None
    wanted = wanted_replicas(config, samples[-1].load)
    if wanted == target:
        return None
    up = wanted > target
    start = samples[-1].at
    for sample in reversed(samples):
        count = wanted_replicas(config, sample.load)
        if (count > target) != up or count == target:
            break
        start = sample.at
    return start + (config.upscale_delay_s if up else config.downscale_delay_s)


class AutoscaleTracker:
    """The leading controller's autoscaling bookkeeping (see the module's docstring).

    A new leadership starts it over (:meth:`forget`): the counts then come from the
    stored decisions, which another leader may have moved.
    """

    def __init__(self, resync_s: float) -> None:
        self.resync_s = resync_s
        self.scaling: dict[str, Scaling] = {}     # autoscaled deployment -> its recent load and target
        self.asleep: tuple[str, ...] = ()         # autoscaled deployments with no replica (target 0)
        self.watched: tuple[str, ...] = ()        # autoscaled deployments whose queue is looked at between passes
        self.watch_s: Optional[float] = None      # how often (the shortest interval any of them needs)
        self.due: Optional[float] = None          # (clock) the next end of an autoscaling delay
        self.stale_scales_dropped = False         # this leadership removed the states of non-autoscaled ones

    def forget(self) -> None:
        """Start over, as a new leadership does."""
        self.scaling.clear()
        self.asleep = ()
        self.watched = ()
        self.watch_s = None
        self.due = None
        self.stale_scales_dropped = False

    def tracks(self, name: str) -> bool:
        """Whether ``name`` is known from an earlier pass of this leadership (else a step
        needs its stored state)."""
        return name in self.scaling

    def step(self, goal: Goal, config: AutoscalingConfig, load: tuple[int, int], now: float, clock: float,
             stored: Optional[AutoscaleState]) -> AutoscaleStep:
        """Sample ``load`` (waiting, serving) and decide the deployment's count.

        ``stored`` is its stored state, needed only while it is not :meth:`tracked <tracks>`:
        a new leadership goes on from the stored count, a new deployment from the goal's
        (``min_replicas``). ``now`` is the time written in the state, ``clock`` the
        controller's clock the samples and delays are measured in. Nothing is kept until
        :meth:`keep`.
        """
        scaling = self.scaling.get(goal.name)
        if scaling is None:
            scaling = Scaling(target=stored.target if stored else goal.num_replicas, written=stored)
        waiting, serving = load
        samples = trim_history(config, (*scaling.samples, LoadSample(clock, waiting, serving)), clock)
        decision = decide(config, scaling.target, samples, clock)
        written = scaling.written
        changed = written is None or decision.target != written.target
        state = AutoscaleState(target=decision.target, reason=decision.reason, waiting=waiting, serving=serving,
                               at=now, changed_at=now if changed else written.changed_at)
        write = change = None
        if written is None or replace(state, at=written.at) != written:
            write = written = state
            if decision.target != scaling.target:
                change = {"from": scaling.target, "to": decision.target, "reason": decision.reason,
                          "waiting": waiting, "serving": serving,
                          "generation": goal.generation, "version": goal.version}
        kept = Scaling(decision.target, samples, written, next_change_at(config, decision.target, samples), config)
        return AutoscaleStep(goal.name, scaling.target, decision.target, write, change, kept)

    def keep(self, step: AutoscaleStep) -> None:
        """Keep what ``step`` decided, once its state is written (if it had one to write)."""
        self.scaling[step.name] = step.kept

    def load_turned(self, waiting: Mapping[str, int]) -> bool:
        """True when a queue pulls its pool another way than the last sample did (with the
        requests served then): a delay starts or ends, or a deployment at zero wakes."""
        for name, count in waiting.items():
            scaling = self.scaling.get(name)
            if scaling is None or scaling.config is None or not scaling.samples:
                continue
            last = scaling.samples[-1]
            was = direction(scaling.config, scaling.target, last.load)
            if direction(scaling.config, scaling.target, count + last.serving) != was:
                return True
        return False

    def states_to_delete(self, goals: list[Goal], autoscaled: AbstractSet[str]) -> list[str]:
        """After a pass: the deployments of ``goals`` that do not autoscale (not in
        ``autoscaled``) whose stored states are to go: those this leadership kept, and on its
        first pass all of them, as it does not know which of them an earlier one scaled."""
        return [g.name for g in goals if g.name not in autoscaled and
                (g.name in self.scaling or not self.stale_scales_dropped)]

    def end_pass(self, autoscaled: AbstractSet[str], unreadable: AbstractSet[str]) -> None:
        """After a pass, once :meth:`states_to_delete` are deleted: drop what is kept of
        deployments that no longer autoscale (not those whose goal could not be read), and
        note which ones sleep at zero, which to look at between passes, and the next
        delay's end."""
        self.stale_scales_dropped = True
        for name in list(self.scaling):
            if name not in autoscaled and name not in unreadable:
                del self.scaling[name]     # no longer autoscaled, or deleted
        self.asleep = tuple(sorted(name for name, s in self.scaling.items() if s.target == 0))
        # An idle deployment with replicas is not looked at: the replica that takes its
        # first request tells the controller (a notification) at once.
        intervals = {name: WAKE_POLL_S if s.target == 0 else sample_interval(s.config)
                     for name, s in self.scaling.items()
                     if s.config is not None and (s.target == 0 or (s.samples and s.samples[-1].load > 0))}
        # Polling more often than a resync is only worth it where it shortens a delay.
        intervals = {name: interval for name, interval in intervals.items() if interval < self.resync_s}
        self.watched = tuple(sorted(intervals))
        self.watch_s = min(intervals.values()) if intervals else None
        dues = [s.due for s in self.scaling.values() if s.due is not None]
        self.due = min(dues) if dues else None
