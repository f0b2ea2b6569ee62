"""Request batching: ``@taskserve.batch`` and the logic that forms batches.

A method decorated with :func:`batch` takes a *list* of items and returns a list
of results, one per item, in order. Callers still send one item each
(``handle.remote(x)``, or an HTTP request whose :class:`~taskserve.http.Request`
is the item); the replica collects the requests waiting for that method and calls
it once with up to ``max_batch_size`` of them, waiting at most
``batch_wait_timeout_s`` for more once the first is there. Each caller gets its
own element of the returned list.

Example::

    import taskserve

    @taskserve.deployment
    class Model:
        @taskserve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        def __call__(self, items: list) -> list:
            return [2 * x for x in items]

        def reconfigure(self, config: dict) -> None:
            # Takes effect for the next batch, without a restart.
            self.__call__.set_max_batch_size(config["max_batch_size"])

    Model.deploy()
    handle = Model.get_handle()
    responses = [handle.remote(i) for i in range(100)]
    [r.result(timeout=10) for r in responses]      # [0, 2, 4, ...], in 4 or more calls of __call__

This module holds only what needs no Redis, no threads and no clock of its own,
so it is imported by user scripts and tested alone:

* :func:`batch`, :class:`BatchedMethod`, :class:`BoundBatch`: the decorator, and
  the per-instance settings that ``set_max_batch_size`` and
  ``set_batch_wait_timeout_s`` change;
* :func:`check_batched_methods`: the deploy-time check of the methods' signatures;
* :func:`run_batch`: one call of the method, fanned out into one :class:`~taskserve.wire.Outcome`
  per request (a wrong-length result, or an exception, fails them all);
* :func:`window_wait`, :class:`ArrivalRate`: how long to wait for more items;
* :class:`PendingItems`: requests received and waiting, by method, oldest first;
* :class:`BatchSizeHistogram`: batch sizes, counted as a Prometheus histogram.

The replica's side (receiving, holding and acknowledging messages) is
:mod:`taskserve.node.batch_server`.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Generic, Optional, TypeVar, Union

from .wire import Outcome

__all__ = [
    "BATCH_SIZES_FIELD", "DEFAULT_BATCH_WAIT_TIMEOUT_S", "DEFAULT_MAX_BATCH_SIZE", "ArrivalRate", "BatchLengthError", "BatchSettings",
    "BatchSizeHistogram", "BatchedMethod", "BoundBatch", "PendingItems", "batch", "batched_methods",
    "bind_batched", "check_batched_methods", "run_batch", "split_results", "window_wait",
]

T = TypeVar("T")

DEFAULT_MAX_BATCH_SIZE = 10
# A batch is held in memory whole: no more items than this, whatever a replica sets.
MAX_BATCH_SIZE = 10_000
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01

# The field of a replica's record (its Redis hash) holding its batch sizes: JSON of
# {method: BatchSizeHistogram.to_dict()}, rewritten at most once a second.
BATCH_SIZES_FIELD = "batch_sizes"

# Where an instance keeps the settings of its batched methods (its own copy of the
# decorator's, which set_max_batch_size and set_batch_wait_timeout_s change).
_SETTINGS_ATTRIBUTE = "_taskserve_batch_settings"

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class BatchLengthError(ValueError):
    """A batched method returned a number of results other than the number of items."""


# --------------------------------------------------------------------------- the decorator


def _checked_size(value: Any) -> int:
    """``value`` if it is a whole number from 1 to :data:`MAX_BATCH_SIZE`.

    >>> _checked_size(8)
    8
    >>> _checked_size(0)
    Traceback (most recent call last):
    ...
    ValueError: max_batch_size must be a whole number from 1 to 10000, not 0
    >>> _checked_size(10**9)
    Traceback (most recent call last):
    ...
    ValueError: max_batch_size must be a whole number from 1 to 10000, not 1000000000
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"max_batch_size must be a whole number from 1 to {MAX_BATCH_SIZE}, not {value!r}")
    return value


def _checked_timeout(value: Any) -> float:
    """``value`` as a float if it is a finite number of seconds, 0 or more.

    >>> _checked_timeout(0)
    0.0
    >>> _checked_timeout(-1)
    Traceback (most recent call last):
    ...
    ValueError: batch_wait_timeout_s must be a number of seconds, 0 or more, not -1
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number of seconds, 0 or more, not {value!r}")
    return float(value)


@dataclass
class BatchSettings:
    """How one batched method of one object forms its batches.

    ``adaptive``: wait only while more items are coming (the queue holds some, or
    the arrival rate says one is due before the window closes); otherwise a batch
    waits for ``max_batch_size`` items or the whole ``batch_wait_timeout_s``.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    adaptive: bool = True

    def __post_init__(self) -> None:
        self.max_batch_size = _checked_size(self.max_batch_size)
        self.batch_wait_timeout_s = _checked_timeout(self.batch_wait_timeout_s)
        self.adaptive = bool(self.adaptive)


class BatchedMethod:
    """A method (or function) decorated with :func:`batch`: a descriptor.

    Looked up on an instance it gives a :class:`BoundBatch` (call it with a list;
    change its settings); looked up on the class it gives itself. As the target
    of a function deployment, calling it calls the function with the list.
    """

    def __init__(self, function: Callable[..., Any], settings: BatchSettings) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.settings = settings          # the decorator's; each instance gets its own copy
        self.name = function.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        if instance is None:
            return self
        return BoundBatch(self, instance)

    def __call__(self, items: list) -> Any:
        return self.function(items)

    def settings_for(self, instance: Any) -> BatchSettings:
        """The settings of this method on ``instance`` (the decorator's for None or an
        object without a ``__dict__``)."""
        store = getattr(instance, "__dict__", None) if instance is not None else None
        if store is None:
            return self.settings
        per_method = store.get(_SETTINGS_ATTRIBUTE)
        if per_method is None:
            per_method = store.setdefault(_SETTINGS_ATTRIBUTE, {})
        found = per_method.get(self.name)
        if found is None:
            found = per_method.setdefault(self.name, replace(self.settings))
        return found

    def __repr__(self) -> str:
        s = self.settings
        return (f"<batched {self.__qualname__} max_batch_size={s.max_batch_size} "
                f"batch_wait_timeout_s={s.batch_wait_timeout_s:g}>")


class BoundBatch:
    """A batched method of one object: call it with a list, or change how it batches.

    >>> class Model:
    ...     @batch(max_batch_size=4)
    ...     def __call__(self, items):
    ...         return [x * 10 for x in items]
    >>> model = Model()
    >>> model([1, 2])
    [10, 20]
    >>> model.__call__.set_max_batch_size(16)
    >>> model.__call__.max_batch_size, Model().__call__.max_batch_size
    (16, 4)
    """

    __slots__ = ("method", "instance")

    def __init__(self, method: BatchedMethod, instance: Any) -> None:
        self.method = method
        self.instance = instance

    def __call__(self, items: list) -> Any:
        if self.instance is None:
            return self.method.function(items)
        return self.method.function(self.instance, items)

    @property
    def settings(self) -> BatchSettings:
        return self.method.settings_for(self.instance)

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_size

    @property
    def batch_wait_timeout_s(self) -> float:
        return self.settings.batch_wait_timeout_s

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Form the next batches of at most ``max_batch_size`` items (from ``reconfigure``, say)."""
        self.settings.max_batch_size = _checked_size(max_batch_size)

    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None:
        """Wait at most ``batch_wait_timeout_s`` for more items in the next batches."""
        self.settings.batch_wait_timeout_s = _checked_timeout(batch_wait_timeout_s)

    def __repr__(self) -> str:
        s = self.settings
        return (f"<bound batched {self.method.__qualname__} max_batch_size={s.max_batch_size} "
                f"batch_wait_timeout_s={s.batch_wait_timeout_s:g}>")


def batch(_function: Optional[Callable[..., Any]] = None, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
          batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S, adaptive: bool = True) -> Any:
    """Serve a method in batches: it takes a list of items and returns one result per item.

    Usable bare (``@batch``) or with settings. ``max_batch_size`` caps the items of
    one call; ``batch_wait_timeout_s`` is the longest a batch waits for more items
    once its first is there. With ``adaptive`` (the default) it waits only while
    more are coming, so a lone request runs at once; ``adaptive=False`` always
    waits for a full batch or the whole timeout.

    The method may be ``async``. It may return any sized iterable (a list, a tuple,
    a NumPy array); an element that is an exception fails that item's request alone.

    >>> class Model:
    ...     @batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    ...     def predict(self, items: list) -> list:
    ...         return [len(items)] * len(items)
    >>> Model.predict
    <batched Model.predict max_batch_size=8 batch_wait_timeout_s=0.005>
    >>> Model().predict(["a", "b", "c"])
    [3, 3, 3]
    """
    settings = BatchSettings(max_batch_size, batch_wait_timeout_s, adaptive)

    def wrap(function: Callable[..., Any]) -> BatchedMethod:
        if isinstance(function, (staticmethod, classmethod)):
            raise TypeError("@taskserve.batch decorates a plain method; a static or class method cannot be batched")
        if not inspect.isfunction(function):
            raise TypeError(f"@taskserve.batch decorates a function or method, not {function!r}")
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(f"{function.__qualname__} is a generator; a batched method returns its results as "
                            "one list")
        return BatchedMethod(function, settings)

    if _function is not None:
        return wrap(_function)
    return wrap


# --------------------------------------------------------------------------- finding and checking


def batched_methods(target: Any) -> dict[str, BatchedMethod]:
    """The batched methods of a class (or of an instance's class) by name; for a
    batched function, ``{"__call__": it}``.

    >>> class Model:
    ...     @batch
    ...     def __call__(self, items):
    ...         return items
    ...     def other(self, x):
    ...         return x
    >>> sorted(batched_methods(Model)), batched_methods(Model()) == batched_methods(Model)
    (['__call__'], True)
    >>> batched_methods(len)
    {}
    """
    if isinstance(target, BatchedMethod):
        return {"__call__": target}
    cls = target if inspect.isclass(target) else type(target)
    found: dict[str, BatchedMethod] = {}
    seen: set[str] = set()
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            if isinstance(value, BatchedMethod):
                found[name] = value
    return found


def bind_batched(target: Any, name: str) -> BoundBatch:
    """The batched method ``name`` of the object requests are served by (an instance,
    or a batched function for ``"__call__"``)."""
    if isinstance(target, BatchedMethod):
        return BoundBatch(target, None)
    bound = getattr(target, name)
    if not isinstance(bound, BoundBatch):
        raise TypeError(f"{type(target).__name__}.{name} is not a batched method")
    return bound


def _signature_problem(function: Callable[..., Any], is_method: bool) -> Optional[str]:
    """Why ``function`` cannot take the list of items as its one argument, or None.

    >>> print(_signature_problem(lambda self: None, is_method=True))
    it takes no parameter besides self to receive the list of items
    >>> print(_signature_problem(lambda self, a, b: None, is_method=True))
    it has 2 required parameters besides self (a, b); it must take exactly one, the list of items
    >>> _signature_problem(lambda self, items, flag=False: None, is_method=True) is None
    True
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None   # nothing to check (a builtin): the call will tell
    parameters = list(signature.parameters.values())
    besides = " besides self" if is_method else ""
    if is_method:
        if not parameters:
            return "it takes no parameter at all, not even self"
        if parameters[0].kind in _POSITIONAL:
            parameters = parameters[1:]
        elif parameters[0].kind != inspect.Parameter.VAR_POSITIONAL:
            return "it takes no positional parameter for self"
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    takes_any = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters)
    required = [p.name for p in positional if p.default is inspect.Parameter.empty]
    keyword_only = [p.name for p in parameters
                    if p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    if keyword_only:
        return (f"its keyword-only parameter{'s' if len(keyword_only) > 1 else ''} {', '.join(keyword_only)} "
                f"{'have' if len(keyword_only) > 1 else 'has'} no default; the list of items is its only argument")
    if len(required) > 1:
        return (f"it has {len(required)} required parameters{besides} ({', '.join(required)}); "
                "it must take exactly one, the list of items")
    if not positional and not takes_any:
        return f"it takes no parameter{besides} to receive the list of items"
    return None


def check_batched_methods(target: Any) -> None:
    """Raise one ``TypeError`` naming every batched method of ``target`` (a class, or a
    batched function) whose signature cannot take the list of items; None if all can.

    Called at deploy time, so a mistake shows before any replica starts.

    >>> class Model:
    ...     @batch
    ...     def __call__(self):
    ...         return []
    ...     @batch
    ...     def score(self, a, b):
    ...         return []
    ...     @batch
    ...     def fine(self, items, scale=1.0):
    ...         return items
    >>> check_batched_methods(Model)
    Traceback (most recent call last):
    ...
    TypeError: 2 batched methods of Model cannot take a list of items: Model.__call__: it takes no parameter besides self to receive the list of items; Model.score: it has 2 required parameters besides self (a, b); it must take exactly one, the list of items. Write each as def method(self, items: list) -> list.
    >>> check_batched_methods(batch(lambda items: items))
    """
    problems: list[str] = []
    if isinstance(target, BatchedMethod):
        problem = _signature_problem(target.function, is_method=False)
        if problem is not None:
            problems.append(f"{target.__qualname__}: {problem}")
        owner = target.__qualname__
        example = "def function(items: list) -> list"
    else:
        cls = target if inspect.isclass(target) else type(target)
        owner = cls.__name__
        example = "def method(self, items: list) -> list"
        seen: set[str] = set()
        for klass in cls.__mro__:
            for name, value in vars(klass).items():
                if name in seen:
                    continue
                seen.add(name)
                inner = getattr(value, "__func__", None)
                if isinstance(value, (staticmethod, classmethod)) and isinstance(inner, BatchedMethod):
                    problems.append(f"{owner}.{name}: a static or class method cannot be batched")
                elif isinstance(value, BatchedMethod):
                    problem = _signature_problem(value.function, is_method=True)
                    if problem is not None:
                        problems.append(f"{owner}.{name}: {problem}")
    if not problems:
        return
    what = "a batched method" if len(problems) == 1 else f"{len(problems)} batched methods"
    raise TypeError(f"{what} of {owner} cannot take a list of items: {'; '.join(problems)}. Write each as {example}.")


# --------------------------------------------------------------------------- running a batch


def split_results(returned: Any, count: int, name: str) -> list[Any]:
    """The ``count`` results of a batch, from what the batched method ``name`` returned.

    Any sized iterable but a string, bytes or a mapping will do.

    >>> split_results((1, 2), 2, "Model.__call__")
    [1, 2]
    >>> split_results([1, 2], 3, "Model.__call__")
    Traceback (most recent call last):
    ...
    taskserve.batching.BatchLengthError: Model.__call__ returned 2 results for a batch of 3 items; a batched method returns exactly one result per item, in order
    >>> split_results(None, 1, "Model.__call__")
    Traceback (most recent call last):
    ...
    TypeError: Model.__call__ returned NoneType, not a list of 1 result; a batched method returns one result per item, in order
    """
    if isinstance(returned, (str, bytes, bytearray, dict)) or not (
            hasattr(returned, "__len__") and hasattr(returned, "__iter__")):
        raise TypeError(f"{name} returned {type(returned).__name__}, not a list of {count} result"
                        f"{'' if count == 1 else 's'}; a batched method returns one result per item, in order")
    if len(returned) != count:
        raise BatchLengthError(
            f"{name} returned {len(returned)} result{'' if len(returned) == 1 else 's'} for a batch of {count} "
            f"item{'' if count == 1 else 's'}; a batched method returns exactly one result per item, in order")
    return list(returned)


def run_batch(call: Callable[[list], Any], items: list, name: str) -> list[Outcome]:
    """Call ``call(items)`` once; one :class:`Outcome` per item, in order.

    An exception, or a result of the wrong length, fails every item with it; an
    element that is an exception fails that item alone.

    >>> [o.value for o in run_batch(lambda xs: [x + 1 for x in xs], [1, 2], "f")]
    [2, 3]
    >>> {o.message for o in run_batch(lambda xs: xs[:1], [1, 2], "f")}
    {'f returned 1 result for a batch of 2 items; a batched method returns exactly one result per item, in order'}
    >>> def fails(xs):
    ...     raise RuntimeError("out of memory")
    >>> [o.error_type for o in run_batch(fails, [1, 2], "f")]
    ['RuntimeError', 'RuntimeError']
    >>> [o.ok for o in run_batch(lambda xs: [1, ValueError("bad item")], ["a", "b"], "f")]
    [True, False]
    """
    try:
        values = split_results(call(items), len(items), name)
    except Exception as error:
        failed = Outcome.of_exception(error)
        return [failed] * len(items)
    return [Outcome.of_exception(value) if isinstance(value, BaseException) else Outcome(True, value)
            for value in values]


# --------------------------------------------------------------------------- the wait window


class ArrivalRate:
    """How often items arrive: the median of the last few gaps between arrivals.

    :meth:`paused` marks a time the receiver was not taking items (its prefetch was
    full), so the gap across it is not counted.

    >>> rate = ArrivalRate()
    >>> for at in (0.0, 0.001, 0.002, 0.003):
    ...     rate.arrived(at)
    >>> rate.mean_gap_s
    0.001
    >>> rate.expects_more(now=0.0035, deadline=0.010)
    True
    >>> rate.expects_more(now=0.0075, deadline=0.010)    # nothing for 4 gaps: the burst is over
    False
    >>> rate.expects_more(now=0.0035, deadline=0.0038)   # the next one is due after the window
    False
    """

    def __init__(self, gaps: int = 8, patience: float = 3.0) -> None:
        self.gaps: deque[float] = deque(maxlen=gaps)
        self.patience = patience
        self.last: Optional[float] = None
        self.mean_gap_s: Optional[float] = None

    def arrived(self, at: float) -> None:
        if self.last is not None:
            self.gaps.append(max(0.0, at - self.last))
            self.mean_gap_s = statistics.median(self.gaps)
        self.last = at

    def paused(self) -> None:
        self.last = None

    def expects_more(self, now: float, deadline: float) -> bool:
        """Whether an item is due before ``deadline``, and the stream has not stopped."""
        if self.mean_gap_s is None or self.last is None:
            return False
        return self.last + self.mean_gap_s <= deadline and now - self.last <= self.patience * self.mean_gap_s

    def give_up_at(self) -> float:
        """When to stop waiting if nothing more arrives (after :meth:`expects_more` said True)."""
        assert self.last is not None and self.mean_gap_s is not None
        return self.last + self.patience * self.mean_gap_s


def window_wait(held: int, settings: BatchSettings, opened_at: float, now: float,
                rate: Optional[ArrivalRate] = None, queued: Optional[int] = None, others: int = 0) -> Optional[float]:
    """How long a batch of ``held`` items, open since ``opened_at``, waits for more.

    ``0.0``: run it now. A positive number: wait at most that long (and decide
    again when an item arrives). ``None``: an adaptive window needs to know how
    many items wait in the queue, not yet received (``queued``), to decide; ask
    once, then call again with it.

    The batch runs at once when it is full or its window (``batch_wait_timeout_s``
    from ``opened_at``) has closed. A fixed window waits otherwise. An adaptive
    one waits only while more items are coming: while the queue holds some, or
    while requests arrive together (the batch holds more than one, or ``others``
    are in flight in the replica) and ``rate`` says the next is due before the
    window closes. A lone request, with the queue empty and nothing else in
    flight, runs at once.

    >>> settings = BatchSettings(max_batch_size=4, batch_wait_timeout_s=0.010)
    >>> window_wait(4, settings, opened_at=0.0, now=0.001)              # full
    0.0
    >>> window_wait(2, settings, opened_at=0.0, now=0.011)              # window closed
    0.0
    >>> window_wait(1, settings, opened_at=0.0, now=0.0) is None        # adaptive: is more queued?
    True
    >>> window_wait(1, settings, opened_at=0.0, now=0.0, queued=0)      # alone, nothing queued: run now
    0.0
    >>> window_wait(1, settings, opened_at=0.0, now=0.002, queued=3)    # more queued: wait for them
    0.008
    >>> window_wait(1, replace(settings, adaptive=False), opened_at=0.0, now=0.004)
    0.006
    """
    if held >= settings.max_batch_size:
        return 0.0
    deadline = opened_at + settings.batch_wait_timeout_s
    remaining = deadline - now
    if remaining <= 0:
        return 0.0
    if not settings.adaptive:
        return remaining
    if (held > 1 or others > 0) and rate is not None and rate.expects_more(now, deadline):
        return max(0.0, min(deadline, rate.give_up_at()) - now)
    if queued is None:
        return None
    return remaining if queued > 0 else 0.0


# --------------------------------------------------------------------------- what waits


class PendingItems(Generic[T]):
    """Items received and waiting to run, by key (the method they call), oldest first.

    >>> pending = PendingItems()
    >>> pending.add("__call__", "a", at=1.0); pending.add("pid", "b", at=2.0); pending.add("__call__", "c", at=3.0)
    >>> pending.oldest(), pending.count("__call__"), len(pending)
    (('__call__', 1.0), 2, 3)
    >>> pending.take("__call__", 5), pending.oldest(), pending.received
    (['a', 'c'], ('pid', 2.0), 3)
    """

    def __init__(self) -> None:
        self.queues: dict[str, deque[tuple[int, float, T]]] = {}
        self.received = 0          # items ever added
        self._order = itertools.count()

    def add(self, key: str, item: T, at: float) -> None:
        self.queues.setdefault(key, deque()).append((next(self._order), at, item))
        self.received += 1

    def count(self, key: str) -> int:
        queue = self.queues.get(key)
        return len(queue) if queue else 0

    def oldest(self) -> Optional[tuple[str, float]]:
        """The key of the item that has waited longest, and when it arrived; None if empty."""
        heads = [(queue[0][0], queue[0][1], key) for key, queue in self.queues.items() if queue]
        if not heads:
            return None
        _, at, key = min(heads)
        return key, at

    def take(self, key: str, limit: int) -> list[T]:
        """Up to ``limit`` items of ``key``, oldest first."""
        queue = self.queues.get(key)
        taken: list[T] = []
        while queue and len(taken) < limit:
            taken.append(queue.popleft()[2])
        return taken

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues.values())


# --------------------------------------------------------------------------- what was run


class BatchSizeHistogram:
    """Batch sizes, counted as a Prometheus histogram (cumulative buckets, sum, count).

    >>> sizes = BatchSizeHistogram(buckets=(1, 4, 16))
    >>> for size in (1, 3, 16, 20):
    ...     sizes.observe(size)
    >>> sizes.to_dict()
    {'buckets': {'1': 1, '4': 2, '16': 3, '+Inf': 4}, 'sum': 40, 'count': 4}
    >>> sizes.mean, sizes.largest
    (10.0, 20)
    """

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

    def __init__(self, buckets: tuple[int, ...] = BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)     # per bucket, not cumulative; the last is +Inf
        self.total = 0
        self.count = 0
        self.largest = 0

    def observe(self, size: int) -> None:
        self.counts[bisect.bisect_left(self.buckets, size)] += 1
        self.total += size
        self.count += 1
        self.largest = max(self.largest, size)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, Union[dict[str, int], int]]:
        running = 0
        cumulative: dict[str, int] = {}
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            cumulative[bound] = running
        return {"buckets": cumulative, "sum": self.total, "count": self.count}
