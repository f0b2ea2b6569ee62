"""The replica's decisions, without Redis: the request gate, check_health, which
messages it serves, when it stops running a request that keeps killing replicas."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from typing import Any, Callable

import pytest
import redis
from kombu import Message
from kombu.transport import virtual

from taskserve.node.answering import refuse_redelivery
from taskserve.node.gate import RequestGate
from taskserve.node.invoke import Dispatcher as _Dispatcher
from taskserve.node.invoke import HealthCheckTimeout, HealthWatch
from taskserve.node.loop import ReplicaLoop
from taskserve.node.transport import ReplicaMessage, ReplicaQoS
from taskserve.wire import TASK_NAME, NotARequest, decode_call

from .helpers import wait_until

_LOOP = ReplicaLoop("test-loop")


def Dispatcher(target: Any, kind: str) -> _Dispatcher:
    return _Dispatcher(target, kind, _LOOP)


def request_problem(message: Any) -> Any:
    """Why ``message`` is not a taskserve call (None if it is one), as a replica decides."""
    try:
        decode_call(message.headers, message.body, message.content_type)
    except NotARequest as error:
        return str(error)
    return None


def _started(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _holds_back_requests(gate: RequestGate) -> bool:
    if gate.try_enter(timeout=0):
        gate.leave()
        return False
    return True


# --------------------------------------------------------------------------- the gate


def test_exclusive_waits_for_requests_in_hand_and_holds_new_ones_back():
    gate = RequestGate()
    order: list[str] = []
    in_request, finish = threading.Event(), threading.Event()

    def first_request() -> None:
        with gate.request():
            in_request.set()
            finish.wait(10)
            order.append("first request")

    def reconfigure() -> None:
        with gate.exclusive():
            order.append("reconfigure")

    def second_request() -> None:
        with gate.request():
            order.append("second request")

    threads = [_started(first_request)]
    assert in_request.wait(10)
    threads.append(_started(reconfigure))
    wait_until(lambda: _holds_back_requests(gate), timeout=10, message="reconfigure to wait for the gate")
    threads.append(_started(second_request))
    assert order == []                        # reconfigure waits for the request in hand
    finish.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first request", "reconfigure", "second request"]


class Model:
    """A request that waits to be released, and a check_health that can hang."""

    def __init__(self) -> None:
        self.serving = threading.Event()
        self.finish_request = threading.Event()
        self.hang = False
        self.release_check = threading.Event()
        self.checks = 0
        self.user_config: Any = None

    def __call__(self, wait: bool = False) -> str:
        if wait:
            self.serving.set()
            self.finish_request.wait(10)
        return "served"

    def check_health(self) -> None:
        self.checks += 1
        if self.hang:
            self.release_check.wait(60)

    def reconfigure(self, user_config: Any) -> None:
        self.user_config = user_config


def test_check_health_runs_while_a_request_is_in_progress():
    model = Model()
    dispatcher = Dispatcher(model, "class")
    answers: list[str] = []
    request = _started(lambda: answers.append(dispatcher.call("__call__", [True], {})))
    assert model.serving.wait(10)

    assert dispatcher.check_health(wait_s=10, timeout_s=10) is True
    assert request.is_alive() and model.checks == 1

    model.finish_request.set()
    request.join(10)
    assert answers == ["served"]


def test_a_hung_check_times_out_counts_as_a_failure_and_holds_up_nothing():
    model = Model()
    model.hang = True
    dispatcher = Dispatcher(model, "class")
    try:
        with pytest.raises(HealthCheckTimeout, match=r"^check_health did not return within 0.05s$"):
            dispatcher.check_health(wait_s=10, timeout_s=0.05)
        assert dispatcher.call("__call__", [], {}) == "served"

        watch = HealthWatch(dispatcher, wait_s=10, timeout_s=0.05)
        assert watch.check() is None and watch.check() is None
        assert watch.check() == "check_health failed 3 times in a row: check_health did not return within 0.05s"
        assert model.checks == 1              # the hung check is waited for, not started again
        dispatcher.reconfigure({"threshold": 1})   # nor is reconfigure
        assert model.user_config == {"threshold": 1}
    finally:
        model.release_check.set()
    model.hang = False
    wait_until(lambda: watch.check() is None and watch.failures == 0, timeout=10,
               message="the released check to pass")


def test_reconfigure_holds_the_check_back_without_a_failure():
    model = Model()
    dispatcher = Dispatcher(model, "class")
    assert dispatcher.gate.try_exclusive(timeout=1)
    try:
        assert dispatcher.check_health(wait_s=0.01, timeout_s=10) is None
        watch = HealthWatch(dispatcher, wait_s=0.01, timeout_s=10)
        assert watch.check() is None and watch.failures == 0
    finally:
        dispatcher.gate.release_exclusive()
    assert model.checks == 0


def test_async_check_health_passes_fails_and_times_out():
    release = threading.Event()

    class Async:
        def __init__(self, outcome: str) -> None:
            self.outcome = outcome

        async def check_health(self) -> None:
            if self.outcome == "raise":
                raise RuntimeError("GPU lost")
            while self.outcome == "hang" and not release.is_set():
                await asyncio.sleep(0.01)

    try:
        assert Dispatcher(Async("pass"), "class").check_health(wait_s=1, timeout_s=10) is True
        with pytest.raises(RuntimeError, match="GPU lost"):
            Dispatcher(Async("raise"), "class").check_health(wait_s=1, timeout_s=10)
        with pytest.raises(HealthCheckTimeout):
            Dispatcher(Async("hang"), "class").check_health(wait_s=1, timeout_s=0.05)
    finally:
        release.set()


def test_a_failing_check_is_reported_with_its_traceback_and_a_pass_resets_the_count():
    model = Model()
    broken = {"now": True}

    def check_health() -> None:
        if broken["now"]:
            raise RuntimeError("model weights missing")

    model.check_health = check_health  # type: ignore[method-assign]
    watch = HealthWatch(Dispatcher(model, "class"), wait_s=1, timeout_s=10, limit=2)
    assert watch.check() is None
    broken["now"] = False
    assert watch.check() is None and watch.failures == 0
    broken["now"] = True
    assert watch.check() is None
    reason = watch.check()
    assert reason.startswith("check_health failed 2 times in a row: Traceback")
    assert "RuntimeError: model weights missing" in reason


# --------------------------------------------------------------------------- max_deliveries


@pytest.mark.parametrize("deliveries, max_deliveries, refused", [
    (0, 3, False), (2, 3, False), (3, 3, True), (7, 3, True), (0, 1, False), (1, 1, True),
])
def test_a_request_is_refused_once_its_replica_died_max_deliveries_times(deliveries, max_deliveries, refused):
    answer = refuse_redelivery(deliveries, max_deliveries)
    assert (answer is not None) == refused
    if refused:
        assert (answer.ok, answer.error_type, answer.message, answer.traceback) == (
            False, "ReplicaCrashed",
            f"a replica died {deliveries} times while serving this request; "
            f"it is not delivered again (max_deliveries={max_deliveries})", "")


# --------------------------------------------------------------------------- what the queue holds


def _task(body: Any, headers: Any = "default", content_type: str = "application/json") -> Message:
    if headers == "default":
        headers = {"task": TASK_NAME, "id": "d9b1", "lang": "py"}
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    message = Message(body=data, content_type=content_type, content_encoding="utf-8", headers=headers)
    message.accept = {content_type} if content_type == "application/json" else {"application/json"}
    return message


@pytest.mark.parametrize("body", [
    [["__call__", [1, "two"], {"three": 3}], {}, {"callbacks": None}],
    [["__taskserve_http__", [{"method": "GET"}], {}], {}, None],
])
def test_a_taskserve_request_is_served(body):
    assert request_problem(_task(body)) is None


@pytest.mark.parametrize("message, why", [
    (_task([[], {}, {}], headers=None), "not a Celery task (no task header)"),
    (_task([[], {}, {}], headers={"id": "x"}), "not a Celery task (no task header)"),
    (_task([[1], {}, {}], headers={"task": "billing.charge", "id": "x"}),
     "a task named 'billing.charge', not taskserve.call"),
    (_task([["__call__", [], {}], {}, {}], headers={"task": TASK_NAME}), "a task without an id"),
    (_task("{not json"), "its body cannot be decoded (JSONDecodeError: "),
    (_task(b"\x80\x03}q\x00.", content_type="application/x-python-serialize"),
     "a pickled body, and this deployment's serializer is json"),
    (_task("just a string"), "its body cannot be decoded"),
    (_task('"just a string"'), "its body is not Celery's (args, kwargs, embed): 'just a string'"),
    (_task([1, 2]), "its body is not Celery's (args, kwargs, embed): [1, 2]"),
    (_task([[1, 2], {}, {}]), "its arguments are not (method, args, kwargs): [1, 2]"),
    (_task([["__call__", "x", 5], {}, {}]), "its arguments are not (method, args, kwargs): ['__call__', 'x', 5]"),
    (_task([[5, [], {}], {}, {}]), "its arguments are not (method, args, kwargs): [5, [], {}]"),
    (_task([["__call__", [], {}], {"x": 1}, {}]), "it has keyword arguments: {'x': 1}"),
    (_task([["__call__", [], {}], [], {}]), "it has keyword arguments: []"),
    (_task([["__call__", [], {}], {}, 7]), "its options are not a mapping: 7"),
])
def test_anything_else_is_refused_saying_why(message, why):
    assert request_problem(message).startswith(why)


class _Channel:
    """Enough of a kombu channel to build a message."""

    codecs = virtual.Channel.codecs
    decode_body = virtual.Channel.decode_body
    do_restore = False


def _envelope(**changes: Any) -> dict:
    envelope = {
        "body": base64.b64encode(json.dumps([["__call__", [], {}], {}, {}]).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": TASK_NAME, "id": "d9b1"},
        "properties": {"body_encoding": "base64", "delivery_tag": "3f2c",
                       "delivery_info": {"exchange": "", "routing_key": "taskserve.echo"}},
    }
    envelope.update(changes)
    return envelope


def test_a_message_envelope_is_read_as_kombu_does():
    message = ReplicaMessage(_envelope(), channel=_Channel())
    assert (message.delivery_tag, message.headers["task"]) == ("3f2c", TASK_NAME)
    assert request_problem(message) is None


@pytest.mark.parametrize("payload, why", [
    ("just a string", "a JSON str, not a message envelope: 'just a string'"),
    ([1, 2], "a JSON list, not a message envelope"),
    ({"hello": "world"}, "not a message envelope (KeyError: 'properties')"),
    (_envelope(properties={"delivery_tag": "3f2c"}), "not a message envelope (no delivery_tag or delivery_info)"),
    (_envelope(properties={"delivery_info": {"exchange": "", "routing_key": "q"}}),
     "not a message envelope (KeyError: 'delivery_tag')"),
    (_envelope(body="%%% not base64"), "not a message envelope (Error: "),
    (_envelope(properties="none"), "not a message envelope (AttributeError: "),
])
def test_what_is_not_a_message_envelope_is_refused_saying_why(payload, why):
    with pytest.raises(NotARequest) as caught:
        ReplicaMessage(payload, channel=_Channel())
    assert str(caught.value).startswith(why)


class _Pipeline:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.executed = 0

    def execute(self) -> list:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.executed += 1
        return [1, 1]


def test_an_acknowledgement_is_retried_while_redis_is_unreachable():
    qos = ReplicaQoS(_Channel())
    pipeline = _Pipeline(failures=2)
    qos._remove_from_indices = lambda tag, pipe=None: pipeline     # the HDEL/ZREM of the ack
    qos.ack("3f2c")
    assert pipeline.executed == 1 and "3f2c" in qos._dirty

    pipeline = _Pipeline(failures=1)
    qos.reject("4a5b", requeue=False)
    assert pipeline.executed == 1
