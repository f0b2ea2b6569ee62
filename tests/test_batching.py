"""Batching without Redis: the decorator, the deploy-time check, running a batch,
the wait window and the bookkeeping of what waits and what ran."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Optional

import cloudpickle
import pytest

from taskserve.batching import (
    ArrivalRate,
    BatchedMethod,
    BatchLengthError,
    BatchSettings,
    BatchSizeHistogram,
    BoundBatch,
    PendingItems,
    batch,
    batched_methods,
    bind_batched,
    check_batched_methods,
    run_batch,
    split_results,
    window_wait,
)
from taskserve.wire import Call, Outcome, _expiry


def envelope(outcome: Outcome) -> dict:
    """An outcome as plain data, to compare outcomes whole."""
    if outcome.ok:
        return {"ok": True, "value": outcome.value}
    return {"ok": False, "type": outcome.error_type, "message": outcome.message, "traceback": outcome.traceback}

# --------------------------------------------------------------------------- the decorator


class Model:
    def __init__(self, scale: int = 1) -> None:
        self.scale = scale
        self.calls: list[list] = []

    @batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        return [item * self.scale for item in items]

    @batch
    async def embed(self, items: list) -> list:
        return [len(item) for item in items]

    def pid(self) -> int:
        return 7


def test_a_batched_method_takes_the_list_and_keeps_its_settings():
    model = Model(scale=10)
    assert model([1, 2, 3]) == [10, 20, 30]
    assert model.calls == [[1, 2, 3]]
    assert isinstance(model.__call__, BoundBatch)
    assert (model.__call__.max_batch_size, model.__call__.batch_wait_timeout_s) == (4, 0.02)
    assert isinstance(Model.__call__, BatchedMethod)
    assert Model.__call__.__name__ == "__call__" and Model.__call__.__wrapped__ is not None
    assert asyncio.run(model.embed(["ab", "c"])) == [2, 1]
    assert (model.embed.max_batch_size, model.embed.batch_wait_timeout_s) == (10, 0.01)   # the defaults


def test_settings_change_per_object_and_are_checked():
    first, second = Model(), Model()
    first.__call__.set_max_batch_size(32)
    first.__call__.set_batch_wait_timeout_s(0)
    assert (first.__call__.max_batch_size, first.__call__.batch_wait_timeout_s) == (32, 0.0)
    assert (second.__call__.max_batch_size, second.__call__.batch_wait_timeout_s) == (4, 0.02)
    assert Model.__call__.settings == BatchSettings(4, 0.02, adaptive=True)      # the decorator's are untouched
    for bad in (0, -1, 2.5, True, "8", 10_001, 10**9):
        with pytest.raises(ValueError, match="max_batch_size must be a whole number from 1 to 10000"):
            first.__call__.set_max_batch_size(bad)
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="batch_wait_timeout_s must be a number of seconds, 0 or more"):
            first.__call__.set_batch_wait_timeout_s(bad)
    assert first.__call__.max_batch_size == 32


def test_the_decorator_refuses_bad_settings_and_what_it_cannot_batch():
    with pytest.raises(ValueError, match="max_batch_size"):
        batch(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        batch(batch_wait_timeout_s=-1)
    with pytest.raises(TypeError, match="a static or class method cannot be batched"):
        batch(staticmethod(lambda items: items))
    with pytest.raises(TypeError, match="decorates a function or method, not 3"):
        batch(3)

    def stream(self, items):
        yield from items

    with pytest.raises(TypeError, match="is a generator; a batched method returns its results as one list"):
        batch(stream)


def test_a_batched_function_is_called_with_the_list():
    @batch(max_batch_size=3)
    def double(items):
        return [2 * x for x in items]

    assert double([1, 2]) == [2, 4]
    assert batched_methods(double) == {"__call__": double}
    bound = bind_batched(double, "__call__")
    assert bound([5]) == [10] and bound.max_batch_size == 3


def test_the_class_and_its_settings_survive_cloudpickle_as_a_deployment_is_shipped():
    model = cloudpickle.loads(cloudpickle.dumps(Model))(scale=3)
    assert model([1, 2]) == [3, 6]
    assert model.__call__.max_batch_size == 4
    model.__call__.set_max_batch_size(9)
    assert model.__call__.max_batch_size == 9


def test_batched_methods_are_found_through_inheritance_and_overrides():
    class Child(Model):
        def embed(self, text):            # no longer batched
            return len(text)

        @batch(max_batch_size=2)
        def score(self, items):
            return items

    assert sorted(batched_methods(Child)) == ["__call__", "score"]
    assert sorted(batched_methods(Child())) == ["__call__", "score"]
    assert batched_methods(Outcome) == {}
    with pytest.raises(TypeError, match="Child.pid is not a batched method"):
        bind_batched(Child(), "pid")


# --------------------------------------------------------------------------- the deploy-time check


@pytest.mark.parametrize("source", [
    "def f(self, items): ...",
    "def f(self, items, scale=1.0, *, verbose=False): ...",
    "def f(self, *items): ...",
    "def f(self, items, /): ...",
    "def f(*args): ...",
    "async def f(self, items): ...",
])
def test_signatures_that_take_a_list_pass(source):
    namespace: dict = {}
    exec(source, namespace)
    cls = type("Fine", (), {"f": batch(namespace["f"])})
    assert check_batched_methods(cls) is None


@pytest.mark.parametrize("source, why", [
    ("def f(self): ...", "it takes no parameter besides self to receive the list of items"),
    ("def f(self, a, b): ...", "it has 2 required parameters besides self (a, b); it must take exactly one"),
    ("def f(self, *, items): ...", "its keyword-only parameter items has no default"),
    ("def f(self, **options): ...", "it takes no parameter besides self to receive the list of items"),
    ("def f(): ...", "it takes no parameter at all, not even self"),
    ("def f(*, items=None): ...", "it takes no positional parameter for self"),
])
def test_signatures_that_cannot_take_a_list_are_refused_with_one_clear_type_error(source, why):
    namespace: dict = {}
    exec(source, namespace)
    cls = type("Broken", (), {"f": batch(namespace["f"])})
    with pytest.raises(TypeError) as caught:
        check_batched_methods(cls)
    message = str(caught.value)
    assert message.startswith("a batched method of Broken cannot take a list of items: Broken.f: ")
    assert why in message
    assert message.endswith("Write each as def method(self, items: list) -> list.")


def test_every_bad_method_is_named_in_the_one_error():
    class Broken(Model):
        @batch
        def a(self):
            return []

        @batch
        def b(self, x, y):
            return []

        wrapped = staticmethod(batch(lambda items: items))

    with pytest.raises(TypeError) as caught:
        check_batched_methods(Broken)
    message = str(caught.value)
    assert message.startswith("3 batched methods of Broken cannot take a list of items: ")
    for part in ("Broken.a: it takes no parameter", "Broken.b: it has 2 required parameters",
                 "Broken.wrapped: a static or class method cannot be batched"):
        assert part in message
    assert check_batched_methods(Model) is None
    assert check_batched_methods(Outcome) is None             # no batched method: nothing to check


def test_a_batched_function_is_checked_without_self():
    assert check_batched_methods(batch(lambda items: items)) is None

    def two(a, b):
        return []

    with pytest.raises(TypeError, match=r"two: it has 2 required parameters \(a, b\).*def function\(items: list\)"):
        check_batched_methods(batch(two))


# --------------------------------------------------------------------------- running a batch


def test_each_item_gets_its_own_element_in_order():
    outcomes = run_batch(lambda items: [f"<{x}>" for x in items], ["a", "b", "c"], "Model.__call__")
    assert [envelope(o) for o in outcomes] == [{"ok": True, "value": f"<{x}>"} for x in "abc"]


def test_a_result_of_the_wrong_length_fails_every_item_naming_both_lengths():
    outcomes = run_batch(lambda items: items[:-1], [1, 2, 3, 4], "Model.__call__")
    envelopes = [envelope(o) for o in outcomes]
    assert len(envelopes) == 4 and all(e == envelopes[0] for e in envelopes)
    assert envelopes[0]["ok"] is False and envelopes[0]["type"] == "BatchLengthError"
    assert envelopes[0]["message"] == ("Model.__call__ returned 3 results for a batch of 4 items; "
                                       "a batched method returns exactly one result per item, in order")
    with pytest.raises(BatchLengthError, match="returned 2 results for a batch of 1 item;"):
        split_results([1, 2], 1, "f")


@pytest.mark.parametrize("returned, kind", [(None, "NoneType"), ("ab", "str"), ({"a": 1, "b": 2}, "dict"),
                                            (5, "int")])
def test_a_result_that_is_not_a_list_fails_every_item(returned, kind):
    outcomes = run_batch(lambda items: returned, ["x", "y"], "Model.__call__")
    assert {envelope(o)["message"] for o in outcomes} == {
        f"Model.__call__ returned {kind}, not a list of 2 results; a batched method returns one result per "
        "item, in order"}


def test_any_sized_iterable_will_do():
    class Vector:                                # as a NumPy array: sized and iterable, not a list
        def __init__(self, values):
            self.values = values

        def __len__(self):
            return len(self.values)

        def __iter__(self):
            return iter(self.values)

    assert [o.value for o in run_batch(lambda items: Vector([x * 2 for x in items]), [1, 2], "f")] == [2, 4]
    assert [o.value for o in run_batch(lambda items: tuple(items), [1, 2], "f")] == [1, 2]


def test_an_exception_fails_every_item_with_it():
    def model(items):
        raise RuntimeError(f"CUDA out of memory at batch size {len(items)}")

    outcomes = run_batch(model, [1, 2, 3], "Model.__call__")
    envelopes = [envelope(o) for o in outcomes]
    assert all(e == envelopes[0] for e in envelopes)
    assert (envelopes[0]["type"], envelopes[0]["message"]) == ("RuntimeError", "CUDA out of memory at batch size 3")
    assert "Traceback (most recent call last)" in envelopes[0]["traceback"] and "in model" in envelopes[0]["traceback"]


def test_an_element_that_is_an_exception_fails_that_item_alone():
    outcomes = run_batch(lambda items: [ValueError(f"bad {x}") if x < 0 else x for x in items], [1, -2, 3], "f")
    assert [o.ok for o in outcomes] == [True, False, True]
    assert envelope(outcomes[1])["message"] == "bad -2"


def test_the_answers_are_those_an_unbatched_replica_gives():
    def fails():
        raise KeyError("weights")

    try:
        fails()
    except KeyError as error:
        unbatched = envelope(Outcome.of_exception(error))
    batched = envelope(run_batch(lambda items: fails(), [1], "f")[0])
    assert set(batched) == set(unbatched) and batched["type"] == unbatched["type"]
    assert batched["message"] == unbatched["message"]
    assert envelope(Outcome(True, 5)) == envelope(run_batch(lambda items: [5], [1], "f")[0])


# --------------------------------------------------------------------------- the wait window


SETTINGS = BatchSettings(max_batch_size=8, batch_wait_timeout_s=0.010)


def streaming(gap: float, arrivals: int, start: float = 0.0) -> ArrivalRate:
    rate = ArrivalRate()
    for n in range(arrivals):
        rate.arrived(start + n * gap)
    return rate


def test_a_full_batch_or_a_closed_window_runs_at_once():
    assert window_wait(8, SETTINGS, opened_at=0.0, now=0.0) == 0.0
    assert window_wait(9, SETTINGS, opened_at=0.0, now=0.0) == 0.0
    assert window_wait(3, SETTINGS, opened_at=0.0, now=0.010) == 0.0
    assert window_wait(3, replace(SETTINGS, adaptive=False), opened_at=0.0, now=0.02) == 0.0


def test_a_fixed_window_waits_for_the_rest_of_the_timeout():
    fixed = replace(SETTINGS, adaptive=False)
    assert window_wait(1, fixed, opened_at=1.0, now=1.0, queued=0) == pytest.approx(0.010)
    assert window_wait(5, fixed, opened_at=1.0, now=1.004, queued=0) == pytest.approx(0.006)
    assert window_wait(1, replace(fixed, batch_wait_timeout_s=0), opened_at=1.0, now=1.0) == 0.0


def test_an_adaptive_window_never_waits_alone_with_an_empty_queue():
    fast_stream = streaming(gap=0.0005, arrivals=8)
    # Even a stream fast enough to fill the window does not hold a lone request:
    # one caller at a time sends its next request only after this answer.
    assert window_wait(1, SETTINGS, opened_at=0.0035, now=0.0036, rate=fast_stream, queued=0) == 0.0
    assert window_wait(1, SETTINGS, opened_at=0.0, now=0.0, queued=None) is None     # ask the queue first


def test_an_adaptive_window_waits_for_what_the_queue_holds():
    assert window_wait(1, SETTINGS, opened_at=0.0, now=0.001, queued=5) == pytest.approx(0.009)
    assert window_wait(1, SETTINGS, opened_at=0.0, now=0.001, queued=5, others=3) == pytest.approx(0.009)


def test_an_adaptive_window_waits_while_a_stream_of_requests_comes_together():
    rate = streaming(gap=0.001, arrivals=4)                 # arrivals at 0, 1, 2, 3 ms
    # Several held: the next is due at 4 ms; give up if nothing came by 3 + 3 x 1 = 6 ms.
    assert window_wait(4, SETTINGS, opened_at=0.0, now=0.0032, rate=rate, queued=0) == pytest.approx(0.0028)
    # One held, but others in flight in the replica: the stream counts too.
    assert window_wait(1, SETTINGS, opened_at=0.0, now=0.0032, rate=rate, queued=0, others=2) == \
        pytest.approx(0.0028)
    # Nothing since 3 ms at 6.5 ms: the burst is over, run what is held.
    assert window_wait(4, SETTINGS, opened_at=0.0, now=0.0065, rate=rate, queued=0) == 0.0
    # Never past the window.
    assert window_wait(4, SETTINGS, opened_at=-0.006, now=0.0032, rate=rate, queued=0) == pytest.approx(0.0008)


def test_an_adaptive_window_does_not_wait_for_a_stream_slower_than_the_window():
    slow = streaming(gap=0.025, arrivals=5)
    last = 4 * 0.025
    assert window_wait(3, SETTINGS, opened_at=last, now=last + 0.0001, rate=slow, queued=0) == 0.0


def test_the_arrival_rate_is_the_median_gap_and_skips_pauses():
    rate = streaming(gap=0.001, arrivals=6)
    rate.arrived(5.0)                                       # one long gap is an outlier, not the rate
    assert rate.mean_gap_s == pytest.approx(0.001)
    rate.paused()                                           # the receiver stopped taking messages
    rate.arrived(60.0)
    rate.arrived(60.001)
    assert rate.mean_gap_s == pytest.approx(0.001)
    assert ArrivalRate().expects_more(now=0.0, deadline=1.0) is False    # nothing known yet


def simulate(arrivals: list[float], settings: BatchSettings, in_queue_at_open: Optional[int] = None
             ) -> list[list[int]]:
    """Batches formed from items arriving at ``arrivals`` (seconds) by one free worker
    running each batch at once, as :meth:`BatchServer.next_job` decides them."""
    pending: PendingItems[int] = PendingItems()
    rate = ArrivalRate()
    batches: list[list[int]] = []
    upcoming = sorted(enumerate(arrivals), key=lambda pair: pair[1])
    now = 0.0
    while upcoming or len(pending):
        if not len(pending):
            index, now = upcoming.pop(0)
            pending.add("m", index, now)
            rate.arrived(now)
        opened = now
        while True:
            queued = sum(1 for _, at in upcoming if at <= now) if in_queue_at_open is None else in_queue_at_open
            wait = window_wait(pending.count("m"), settings, opened, now, rate, queued)
            assert wait is not None
            next_at = upcoming[0][1] if upcoming else None
            if wait <= 0:
                break
            if next_at is not None and next_at <= now + wait:
                index, now = upcoming.pop(0)
                pending.add("m", index, now)
                rate.arrived(now)
                continue
            now += wait
        batches.append(pending.take("m", settings.max_batch_size))
    return batches


def test_batches_respect_the_size_cap_and_the_window():
    fixed = BatchSettings(max_batch_size=4, batch_wait_timeout_s=0.010, adaptive=False)
    # 10 items 1 ms apart: full batches of 4, then what came in the last window.
    assert simulate([i * 0.001 for i in range(10)], fixed) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # Items 20 ms apart: each waits out the window alone.
    assert simulate([0.0, 0.020, 0.040], fixed) == [[0], [1], [2]]
    # A burst already queued: the adaptive window takes the lot, then runs at once.
    adaptive = replace(fixed, max_batch_size=16)
    assert simulate([0.0] * 6, adaptive) == [[0, 1, 2, 3, 4, 5]]
    # A lone request, nothing behind it: runs at once.
    assert simulate([0.0, 0.5], adaptive) == [[0], [1]]


# --------------------------------------------------------------------------- bookkeeping


def test_pending_items_run_oldest_first_by_method():
    pending: PendingItems[str] = PendingItems()
    for at, (key, item) in enumerate([("pid", "p1"), ("__call__", "a"), ("__call__", "b"), ("pid", "p2")]):
        pending.add(key, item, at=float(at))
    assert pending.oldest() == ("pid", 0.0)
    assert pending.take("pid", 1) == ["p1"]
    assert pending.oldest() == ("__call__", 1.0)
    assert pending.take("__call__", 1) == ["a"]
    assert (pending.count("__call__"), pending.count("missing"), len(pending), pending.received) == (1, 0, 2, 4)
    assert pending.take("missing", 3) == []


def test_batch_sizes_are_a_prometheus_histogram():
    sizes = BatchSizeHistogram()
    for size in (1, 1, 7, 32, 33, 2000):
        sizes.observe(size)
    data = json.loads(json.dumps(sizes.to_dict()))
    assert data["buckets"]["1"] == 2 and data["buckets"]["8"] == 3 and data["buckets"]["32"] == 4
    assert data["buckets"]["64"] == 5 and data["buckets"]["1024"] == 5 and data["buckets"]["+Inf"] == 6
    assert (data["sum"], data["count"], sizes.largest) == (2074, 6, 2000)
    assert list(data["buckets"].values()) == sorted(data["buckets"].values())


def test_expired_requests_are_recognised_by_their_expires_header():
    def expired(header):
        return Call("t", "m", [], {}, expires_at=_expiry(header)).expired()

    assert expired("2000-01-01T00:00:00+00:00")
    assert not expired("2999-01-01T00:00:00.000000+00:00")
    assert not expired(None) and not expired("") and not expired("not a date")


def test_deploy_refuses_a_batched_method_that_cannot_take_a_list_before_connecting(monkeypatch, tmp_path):
    import taskserve

    monkeypatch.delenv("TASKSERVE_ADDRESS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    @taskserve.deployment
    class NoItems:
        @taskserve.batch
        def __call__(self):
            return []

    with pytest.raises(TypeError, match="cannot take a list of items"):
        NoItems.deploy()
