"""The pure autoscaler: from a deployment's recent load, decide how many replicas it wants.

``decide()`` does no I/O. The controller samples the **load** of each autoscaled
deployment, the requests waiting in its queue ``taskserve.<name>`` plus those its
replicas are serving, keeps what the delays need (:func:`trim_history`) and asks
``decide()`` for the target on each pass. The rules:

- a sample **wants** ``ceil(load / target_ongoing_requests)`` replicas, clamped to
  ``[min_replicas, max_replicas]``; the target is always within those bounds (a changed
  config applies at once);
- a sample holds from its ``at`` until the next one, so a window of time is covered by
  the samples after its start and the one in effect at its start; a window the history
  does not reach back to (the controller just started) moves nothing;
- **up** when every sample of the last ``upscale_delay_s`` wants more than ``current``,
  to the fewest of them: what was wanted the whole time. A spike's peak starts no
  replica that idles once the backlog is served; a load that stays keeps scaling up,
  one window after the other;
- **down** when every sample of the last ``downscale_delay_s`` wants fewer, to the most
  of them: enough for the busiest moment of that window;
- **from zero**, the first request (waiting, or served by a replica still draining)
  starts what the latest sample wants at once: with no replica, nobody would serve it
  during an upscale delay;
- otherwise the count stays.

The target never reverses within the delay of its new direction: the samples that
justified a move stay in the other direction's window for that long, and they want the
opposite. The one exception is a wake from zero right after a scale to zero.

``current`` is the target in force (the previous decision), not the replicas running
now: replicas still starting count, or each pass would add more for the same load.

Example::

    >>> config = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=5)
    >>> history = [LoadSample(at=t, waiting=10, serving=4) for t in (0.0, 1.0, 2.0, 3.0)]
    >>> decide(config, current=1, history=history, now=3.0)
    Decision(target=3, reason='3 replicas for 14 waiting/serving, target 5 each')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .spec import AutoscalingConfig
from .state import Replica, ReplicaState

__all__ = [
    "AutoscalingConfig",
    "Decision",
    "LoadSample",
    "ReplicaLoad",
    "choose_replicas_to_remove",
    "decide",
    "direction",
    "sample_interval",
    "trim_history",
    "wanted_replicas",
]

# The shortest interval between two looks at a deployment's load (one Redis command).
MIN_SAMPLE_INTERVAL_S = 0.1


@dataclass(frozen=True)
class LoadSample:
    """A deployment's load at the time ``at`` (seconds, any clock the caller keeps using)."""

    at: float
    waiting: int        # requests in the deployment's queue
    serving: int        # requests its replicas have in hand

    @property
    def load(self) -> int:
        return max(0, self.waiting + self.serving)


@dataclass(frozen=True)
class Decision:
    """The replica count to aim at, and why, in one line (shown by ``status``)."""

    target: int
    reason: str


# --------------------------------------------------------------------------- rules


def wanted_replicas(config: AutoscalingConfig, load: int) -> int:
    """Replicas for ``load`` requests: ``ceil(load / target_ongoing_requests)`` within the bounds.

    >>> config = AutoscalingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=2)
    >>> [wanted_replicas(config, load) for load in (0, 1, 2, 3, 8, 100)]
    [0, 1, 1, 2, 4, 4]
    """
    return _clamp(config, _unclamped(config, load))


def decide(config: AutoscalingConfig, current: int, history: Sequence[LoadSample], now: float) -> Decision:
    """The target replica count at ``now`` after the load ``history`` (the rules above).

    ``history`` may be in any order; samples after ``now`` are not used yet. Nothing
    given is changed, and the same arguments give the same decision.

    >>> config = AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=2,
    ...                            upscale_delay_s=3, downscale_delay_s=60)
    >>> decide(config, 0, [LoadSample(at=10.0, waiting=1, serving=0)], now=10.0).target   # wake at once
    1
    >>> rising = [LoadSample(at=0.0, waiting=2, serving=2), LoadSample(at=2.0, waiting=8, serving=2)]
    >>> decide(config, 2, rising, now=4.0)       # 5 wanted, not yet for 3 s
    Decision(target=2, reason='2 replicas for 10 waiting/serving, target 2 each; 5 wanted, scaling up if that holds for 3 s')
    >>> decide(config, 2, rising, now=5.0).target
    5
    >>> decide(config, 2, [LoadSample(at=0.0, waiting=0, serving=0)], now=60.0).target     # idle for 60 s
    0
    """
    samples = _known(history, now)
    held = _clamp(config, current)
    if not samples:
        return Decision(held, f"{_replicas(held)}; no load measured yet")
    latest = samples[-1]
    if current <= 0 and latest.load > 0:
        target = wanted_replicas(config, latest.load)
        return Decision(target, _describe(config, target, latest) + "; woken from zero")
    up = _window(samples, now - config.upscale_delay_s)
    if up is not None:
        least = min(_wants(config, up))
        if least > held:
            return Decision(least, _describe(config, least, latest))
    down = _window(samples, now - config.downscale_delay_s)
    if down is not None:
        most = max(_wants(config, down))
        if most < held:
            return Decision(most, _describe(config, most, latest))
    return Decision(held, _describe(config, held, latest))


def sample_interval(config: AutoscalingConfig) -> float:
    """How often the load must be looked at: a quarter of ``upscale_delay_s`` (at least
    :data:`MIN_SAMPLE_INTERVAL_S`).

    A rise is seen at most one interval after it began and acted on ``upscale_delay_s``
    after it was seen, so a scale-up comes at most a quarter of the delay late.

    >>> [sample_interval(AutoscalingConfig(upscale_delay_s=d)) for d in (0, 0.5, 3)]
    [0.1, 0.125, 0.75]
    """
    return max(MIN_SAMPLE_INTERVAL_S, config.upscale_delay_s / 4)


def direction(config: AutoscalingConfig, current: int, load: int) -> int:
    """Which way ``load`` pulls a pool of ``current`` replicas: 1 (more wanted), -1 (fewer)
    or 0. A run of samples of one direction is what starts a delay, so a new look at the
    load that pulls another way than the last sample is worth a new decision.

    >>> config = AutoscalingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=2)
    >>> [direction(config, 1, load) for load in (0, 1, 2, 3)]
    [-1, 0, 0, 1]
    """
    wanted = wanted_replicas(config, load)
    return (wanted > current) - (wanted < current)


def trim_history(config: AutoscalingConfig, history: Iterable[LoadSample], now: float) -> tuple[LoadSample, ...]:
    """The samples ``decide`` can still use at ``now`` or later, oldest first: those after
    ``now - max(upscale_delay_s, downscale_delay_s)`` and the one in effect then.

    >>> config = AutoscalingConfig(upscale_delay_s=3, downscale_delay_s=10)
    >>> [s.at for s in trim_history(config, [LoadSample(t, 0, 0) for t in range(0, 20, 4)], now=20)]
    [8, 12, 16]
    """
    ordered = sorted(history, key=lambda sample: sample.at)
    start = now - max(config.upscale_delay_s, config.downscale_delay_s)
    in_effect = [index for index, sample in enumerate(ordered) if sample.at <= start]
    return tuple(ordered[in_effect[-1]:] if in_effect else ordered)


# --------------------------------------------------------------------------- scale-down victims


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica as a scale-down sees it: how far it got, and the requests in its hands."""

    replica_id: str
    state: ReplicaState
    in_flight: int = 0          # requests it is serving (or holds, prefetched)
    placed: bool = True         # False while it waits for a node
    created_at: float = 0.0

    @classmethod
    def of(cls, replica: Replica, in_flight: int = 0) -> "ReplicaLoad":
        """The view of a replica record.

        >>> ReplicaLoad.of(Replica("m-1", "m", "s", "v1", node_id="", state=ReplicaState.PENDING)).placed
        False
        """
        return cls(replica.replica_id, replica.state, in_flight, bool(replica.node_id), replica.created_at)


# The earlier a state, the less a replica has cost so far and the less it serves.
_STATE_ORDER = {
    ReplicaState.PENDING: 1,
    ReplicaState.STARTING: 2,
    ReplicaState.RECONFIGURING: 3,
    ReplicaState.RUNNING: 4,
}
_LEAVING = (ReplicaState.DRAINING, ReplicaState.STOPPED, ReplicaState.FAILED)


def choose_replicas_to_remove(replicas: Iterable[ReplicaLoad], count: int) -> tuple[str, ...]:
    """The ids of ``count`` replicas a scale-down should stop, in order.

    Replicas already leaving (draining, stopped, failed: choosing them costs nothing, and
    the count they leave is right) first, then not placed, placed but not spawned,
    starting, reconfiguring, then idle running ones, then busy ones (fewest requests in
    hand first); within each, the newest first.

    >>> replicas = [ReplicaLoad("busy", ReplicaState.RUNNING, in_flight=3),
    ...             ReplicaLoad("idle", ReplicaState.RUNNING),
    ...             ReplicaLoad("new", ReplicaState.STARTING),
    ...             ReplicaLoad("light", ReplicaState.RUNNING, in_flight=1)]
    >>> choose_replicas_to_remove(replicas, 3)
    ('new', 'idle', 'light')
    """
    if count <= 0:
        return ()
    ordered = sorted(replicas, key=_removal_key)
    return tuple(replica.replica_id for replica in ordered[:count])


def _removal_key(replica: ReplicaLoad) -> tuple:
    if replica.state in _LEAVING:
        tier = -1
    elif replica.in_flight > 0:
        tier = 5
    elif not replica.placed:
        tier = 0
    else:
        tier = _STATE_ORDER.get(replica.state, 2)
    return (tier, replica.in_flight, -replica.created_at, replica.replica_id)


# --------------------------------------------------------------------------- helpers


def _unclamped(config: AutoscalingConfig, load: int) -> int:
    # The epsilon keeps 3 / 0.1 (30.000000000000004 in floats) at 30.
    return max(0, math.ceil(load / config.target_ongoing_requests - 1e-9))


def _clamp(config: AutoscalingConfig, count: int) -> int:
    return min(config.max_replicas, max(config.min_replicas, count))


def _known(history: Iterable[LoadSample], now: float) -> list[LoadSample]:
    """The samples taken by ``now``, oldest first (the order of equal times kept)."""
    return sorted((sample for sample in history if sample.at <= now), key=lambda sample: sample.at)


def _window(samples: list[LoadSample], start: float) -> Optional[list[LoadSample]]:
    """The samples in effect from ``start`` to now, or None when none was taken by ``start``."""
    first = None
    for index, sample in enumerate(samples):
        if sample.at > start:
            break
        first = index
    return None if first is None else samples[first:]


def _wants(config: AutoscalingConfig, samples: list[LoadSample]) -> list[int]:
    return [wanted_replicas(config, sample.load) for sample in samples]


def _describe(config: AutoscalingConfig, target: int, latest: LoadSample) -> str:
    """The reason line: the target for the latest load, and what holds the count if anything."""
    text = f"{_replicas(target)} for {latest.load} waiting/serving, target {_num(config.target_ongoing_requests)} each"
    raw = _unclamped(config, latest.load)
    wanted = _clamp(config, raw)
    if wanted > target:
        text += f"; {wanted} wanted, scaling up if that holds for {_num(config.upscale_delay_s)} s"
    elif wanted < target:
        text += f"; {wanted} wanted, scaling down if that holds for {_num(config.downscale_delay_s)} s"
    elif raw > target == config.max_replicas:
        text += f"; max_replicas is {config.max_replicas}"
    elif raw < target == config.min_replicas:
        text += f"; min_replicas is {config.min_replicas}"
    return text


def _replicas(count: int) -> str:
    return f"{count} replica" if count == 1 else f"{count} replicas"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
