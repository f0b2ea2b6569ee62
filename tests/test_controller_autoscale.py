"""The controller's autoscaling on fakeredis and on a real redis-server (the fixtures
``server`` and ``client`` of tests/helpers.py): load sampled from the queue and kombu's
unacked hash, targets per :func:`taskserve.autoscaler.decide`, stored in their own key
(no new generation), one history line per change, failover, bounds, scale to zero.

The controller's clock is a fake one, so the delays pass at once. Messages are raw
items pushed to a deployment's queue and raw entries of the ``unacked`` hash, as kombu
writes them.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Optional

import pytest
import redis
from kombu.transport import redis as kombu_redis

from taskserve.autoscaler import LoadSample, decide, sample_interval
from taskserve.autoscaler_tracker import WAKE_POLL_S
from taskserve.controller import Controller
from taskserve.spec import AutoscalingConfig
from taskserve.state import Goal, Node, ReplicaState, Resources
from taskserve.store import UNACKED_INDEX_KEY, UNACKED_KEY, LeaseLost, Store, queue_name

from .helpers import redis_client, redis_under_test, signed  # noqa: F401  (the fixtures "client", "server")

NAME = "model"
CONFIG = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
          "upscale_delay_s": 0.5, "downscale_delay_s": 2}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(client) -> Store:
    store = Store(client)
    store.register_node(Node("node-a", Resources(8, 0, 2**33)), ttl_s=60)
    return store


@pytest.fixture
def clock() -> Clock:
    return Clock()


def leading(store: Store, clock: Clock) -> Controller:
    controller = Controller(store, clock=clock)
    controller._lead(store.acquire_lease(controller.controller_id, 60))
    assert controller.leading
    return controller


def deploy(store: Store, name: str = NAME, autoscaling: Optional[dict] = CONFIG, num_replicas: Optional[int] = None,
           version: str = "v1") -> Goal:
    """What ``deploy()`` writes: with autoscaling, ``num_replicas`` is ``min_replicas``."""
    if num_replicas is None:
        num_replicas = autoscaling["min_replicas"] if autoscaling else 1
    options = {"num_cpus": 0.5, "max_unavailable": 0.2, "autoscaling_config": autoscaling}
    goal = Goal(name=name, generation=0, version=version, spec_hash=f"spec-{version}", num_replicas=num_replicas,
                options=options, code_sha="code", init_sha="init", user_version=version)
    written = store.update_goal(name, signed(lambda previous: goal), "deploy", missing_ok=True)
    assert written is not None
    return written


def waiting(client, count: int, name: str = NAME) -> None:
    """``count`` requests in the deployment's queue."""
    client.lpush(queue_name(name), *[json.dumps({"body": f"request {i}"}) for i in range(count)])


def serving(client, count: int, name: str = NAME) -> None:
    """``count`` requests a replica of the deployment took and has not acknowledged."""
    for _ in range(count):
        tag = f"tag-{client.incr('test-tags')}"
        entry = json.dumps([{"body": "e30=", "headers": {"id": tag}, "properties": {"delivery_tag": tag}},
                            "", queue_name(name)])
        client.hset(UNACKED_KEY, tag, entry)
        client.zadd(UNACKED_INDEX_KEY, {tag: time.time()})


def seconds_in_wait(controller: Controller, store: Store, client=None, late_requests: int = 0,
                    late_s: float = 0.3) -> float:
    """How long ``controller._wait`` blocks, subscribed to the store's events; with
    ``late_requests``, that many requests join the queue (through ``client``) ``late_s`` into it.

    Example: ``assert seconds_in_wait(controller, store, client, 1) >= 0.3``
    """
    pubsub = store.subscribe()
    pubsub.get_message(timeout=0.1)                   # the subscription's confirmation
    timer = threading.Timer(late_s, waiting, args=(client, late_requests)) if late_requests else None
    try:
        if timer is not None:
            timer.start()
        started = time.monotonic()
        controller._wait(pubsub)
        return time.monotonic() - started
    finally:
        if timer is not None:
            timer.join()
        pubsub.close()


def idle(client, name: str = NAME) -> None:
    client.delete(queue_name(name), UNACKED_KEY, UNACKED_INDEX_KEY)


def active(store: Store, name: str = NAME) -> int:
    """Replicas told to run."""
    return sum(1 for r in store.replicas_of(name) if r.desired == "run")


def run_all(store: Store, name: str = NAME) -> None:
    for replica in store.replicas_of(name):
        store.update_replica(replica.replica_id, state=ReplicaState.RUNNING, applied_config_hash=replica.config_hash)


def autoscale_lines(store: Store, name: str = NAME) -> list[dict]:
    return [e for e in store.history(name) if e["action"] == "autoscale"]


def test_the_unacked_keys_are_kombus():
    assert (UNACKED_KEY, UNACKED_INDEX_KEY) == (kombu_redis.Channel.unacked_key, kombu_redis.Channel.unacked_index_key)


def test_the_target_follows_decide_once_the_upscale_delay_passed(store, client, clock):
    goal = deploy(store)
    controller = leading(store, clock)
    controller.reconcile_once()
    run_all(store)
    assert store.autoscale_state(NAME).target == 1 and active(store) == 1

    waiting(client, 6)
    serving(client, 1)
    clock.now += 0.2
    controller.reconcile_once()
    state = store.autoscale_state(NAME)
    assert (state.target, state.waiting, state.serving) == (1, 6, 1)
    assert state.reason == ("1 replica for 7 waiting/serving, target 1 each; "
                            "4 wanted, scaling up if that holds for 0.5 s")
    assert controller.autoscaling.due == pytest.approx(100.7)       # the next pass is due when the delay ends
    assert active(store) == 1

    clock.now += 0.5
    controller.reconcile_once()
    expected = decide(AutoscalingConfig(**CONFIG), 1,
                      [LoadSample(100.0, 0, 0), LoadSample(100.2, 6, 1), LoadSample(100.7, 6, 1)], 100.7)
    state = store.autoscale_state(NAME)
    assert (state.target, state.reason) == (expected.target, expected.reason) == (4, expected.reason)
    assert active(store) == 4
    [line] = autoscale_lines(store)
    assert (line["by"], line["from"], line["to"], line["reason"]) == ("autoscaler", 1, 4, expected.reason)
    assert (line["waiting"], line["serving"], line["generation"], line["version"]) == (6, 1, goal.generation, "v1")
    assert "goal" not in line
    assert store.get_goal(NAME) == goal, "no new generation: a deploy() waiting for its rollout is not disturbed"


def test_the_pool_shrinks_after_the_downscale_delay_and_each_change_is_one_line(store, client, clock):
    deploy(store)
    controller = leading(store, clock)
    waiting(client, 8)
    controller.reconcile_once()
    clock.now += 0.5
    controller.reconcile_once()
    run_all(store)
    assert store.autoscale_state(NAME).target == 4

    idle(client)
    for _ in range(4):          # idle from 101.0 (the busy sample of 100.5 holds until then): 2 s at 103.0
        clock.now += 0.5
        controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 4 and active(store) == 4
    assert controller.autoscaling.due == pytest.approx(103.0)
    clock.now += 0.5
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 1
    assert active(store) == 1
    assert [(e["from"], e["to"]) for e in autoscale_lines(store)] == [(1, 4), (4, 1)]
    assert [e["generation"] for e in store.history(NAME)] == [1, 1, 1]


def test_state_is_written_only_when_it_changes(store, client, clock, monkeypatch):
    deploy(store)
    controller = leading(store, clock)
    controller.reconcile_once()
    writes = []
    real = store.set_autoscale_state
    monkeypatch.setattr(store, "set_autoscale_state", lambda *a, **k: writes.append(a) or real(*a, **k))
    for _ in range(5):
        clock.now += 1
        controller.reconcile_once()
    assert writes == []
    waiting(client, 1)
    clock.now += 1
    controller.reconcile_once()
    assert len(writes) == 1 and store.autoscale_state(NAME).waiting == 1


def test_a_decision_whose_write_failed_is_written_in_the_next_pass(store, client, clock, monkeypatch):
    deploy(store)
    controller = leading(store, clock)
    controller.reconcile_once()
    waiting(client, 1)
    real = store.set_autoscale_state

    def unreachable(*args, **kwargs):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(store, "set_autoscale_state", unreachable)
    clock.now += 1
    with pytest.raises(redis.ConnectionError):
        controller.reconcile_once()
    monkeypatch.setattr(store, "set_autoscale_state", real)
    controller.reconcile_once()                       # the same load: only the failed write is new
    assert store.autoscale_state(NAME).waiting == 1


def test_a_new_controller_goes_on_from_the_stored_target(store, client, clock, server):
    deploy(store)
    first = leading(store, clock)
    waiting(client, 8)
    first.reconcile_once()
    clock.now += 0.5
    first.reconcile_once()
    run_all(store)
    assert store.autoscale_state(NAME).target == 4
    before = {r.replica_id for r in store.replicas_of(NAME)}
    store.release_lease(first.controller_id)        # it failed over

    idle(client)
    second = leading(Store(server.connect()), clock)
    for _ in range(4):                               # its first sample is at 101.0
        clock.now += 0.5
        second.reconcile_once()
    assert store.autoscale_state(NAME).target == 4, "not min_replicas: the stored count"
    assert {r.replica_id for r in store.replicas_of(NAME) if r.desired == "run"} == before
    assert len(autoscale_lines(store)) == 1
    clock.now += 0.5                                 # 2 s of its own samples: the downscale delay
    second.reconcile_once()
    assert store.autoscale_state(NAME).target == 1


def test_a_config_change_clamps_the_stored_target_at_once(store, client, clock):
    goal = deploy(store)
    controller = leading(store, clock)
    waiting(client, 8)
    controller.reconcile_once()
    clock.now += 0.5
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 4

    narrower = {**CONFIG, "max_replicas": 2}
    store.update_goal(NAME, signed(lambda previous: {"options": {**previous.options, "autoscaling_config": narrower}}),
                      "deploy")
    controller.reconcile_once()                       # same clock: no delay passed
    state = store.autoscale_state(NAME)
    assert state.target == 2 and state.reason.endswith("max_replicas is 2")
    assert active(store) == 2
    assert [(e["from"], e["to"], e["generation"]) for e in autoscale_lines(store)] == [
        (1, 4, goal.generation), (4, 2, goal.generation + 1)]

    higher = {**CONFIG, "min_replicas": 3}
    store.update_goal(NAME, signed(lambda previous: {"options": {**previous.options, "autoscaling_config": higher}}),
                      "deploy")
    idle(client)
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 3 and active(store) == 3


def test_a_rolling_update_keeps_the_autoscaled_count(store, client, clock):
    deploy(store)
    controller = leading(store, clock)
    waiting(client, 3)
    controller.reconcile_once()
    clock.now += 0.5
    controller.reconcile_once()
    run_all(store)
    assert active(store) == 3

    deploy(store, version="v2")                      # its goal says num_replicas=1 (min_replicas)
    for _ in range(6):
        clock.now += 0.1
        controller.reconcile_once()
        run_all(store)
    current = [r for r in store.replicas_of(NAME) if r.desired == "run"]
    assert sorted(r.version for r in current) == ["v2", "v2", "v2"]
    assert store.autoscale_state(NAME).target == 3


def test_a_deployment_that_does_not_autoscale_is_untouched(store, client, clock, monkeypatch):
    hgetall_keys: list[str] = []
    real_hgetall = redis.commands.core.HashCommands.hgetall

    def spy(self, name):
        hgetall_keys.append(name.decode() if isinstance(name, bytes) else name)
        return real_hgetall(self, name)

    monkeypatch.setattr(redis.commands.core.HashCommands, "hgetall", spy)
    goal = deploy(store, autoscaling=None, num_replicas=2)
    waiting(client, 50)
    serving(client, 2)
    controller = leading(store, clock)
    for _ in range(3):
        clock.now += 1
        controller.reconcile_once()
    assert active(store) == 2
    assert UNACKED_KEY not in hgetall_keys, "no HGETALL of kombu's hash while nothing autoscales"
    assert hgetall_keys, "the spy sees the other reads"
    assert store.autoscale_state(NAME) is None and autoscale_lines(store) == []
    assert store.get_goal(NAME) == goal

    deploy(store, "scaled")
    controller.reconcile_once()
    assert hgetall_keys.count(UNACKED_KEY) == 1, "one HGETALL per pass"
    assert store.autoscale_state(NAME) is None


def test_scale_to_zero_and_wake_up_on_the_first_request(store, client, clock):
    config = {**CONFIG, "min_replicas": 0, "downscale_delay_s": 1}
    deploy(store, autoscaling=config)
    controller = leading(store, clock)
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 0 and active(store) == 0
    assert controller.autoscaling.asleep == (NAME,)

    waiting(client, 1)
    clock.now += 0.1
    controller.reconcile_once()                       # at once, no upscale delay
    assert store.autoscale_state(NAME).target == 1 and active(store) == 1
    assert controller.autoscaling.asleep == ()
    [line] = autoscale_lines(store)
    assert (line["from"], line["to"]) == (0, 1) and line["reason"].endswith("woken from zero")

    run_all(store)
    client.delete(queue_name(NAME))
    serving(client, 1)                                # being served: it stays
    clock.now += 5
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 1
    idle(client)
    controller.reconcile_once()
    clock.now += 1
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 0 and active(store) == 0
    assert controller.autoscaling.asleep == (NAME,)


def test_a_request_for_a_deployment_at_zero_ends_the_wait_between_passes(store, client):
    deploy(store, autoscaling={**CONFIG, "min_replicas": 0})
    controller = Controller(store, resync_s=10)
    controller._lead(store.acquire_lease(controller.controller_id, 60))
    controller.reconcile_once()
    assert controller.autoscaling.asleep == (NAME,)
    waited = seconds_in_wait(controller, store, client, late_requests=1)
    assert 0.3 <= waited < 0.3 + 5 * WAKE_POLL_S, waited


def test_a_backlog_on_a_busy_deployment_ends_the_wait_within_the_sample_interval(store, client):
    deploy(store)                                     # upscale_delay_s=0.5: looked at every 0.125 s
    controller = Controller(store, resync_s=10)
    controller._lead(store.acquire_lease(controller.controller_id, 60))
    controller.reconcile_once()
    assert controller.autoscaling.watched == (), "idle, with a replica: its replica will say when it gets load"
    serving(client, 1)
    controller.reconcile_once()
    assert (controller.autoscaling.watched, controller.autoscaling.watch_s) == ((NAME,), sample_interval(AutoscalingConfig(**CONFIG)))
    assert controller.autoscaling.due is None
    waited = seconds_in_wait(controller, store, client, late_requests=4)
    assert 0.3 <= waited < 0.3 + 4 * controller.autoscaling.watch_s, waited


def test_a_load_that_keeps_pulling_the_same_way_needs_no_pass_between_looks(store, client, clock):
    deploy(store)
    controller = leading(store, clock)
    waiting(client, 3)
    serving(client, 1)
    controller.reconcile_once()                       # 4 wanted, 1 in force: the delay runs
    assert controller.autoscaling.scaling[NAME].target == 1
    assert not controller.autoscaling.load_turned({NAME: 3})
    assert not controller.autoscaling.load_turned({NAME: 9}), "more of the same: the delay already runs"
    assert controller.autoscaling.load_turned({NAME: 0}), "1 served, none waiting: the run of 'more' broke"
    idle(client)
    controller.reconcile_once()
    assert not controller.autoscaling.load_turned({NAME: 0})
    assert controller.autoscaling.load_turned({NAME: 2}), "a backlog starts a delay"
    assert not controller.autoscaling.load_turned({"other": 5}), "not an autoscaled deployment"


def test_which_deployments_are_looked_at_between_passes(store, client, clock):
    deploy(store, "fast")                                                        # 0.5 s up: every 0.125 s
    deploy(store, "slow", autoscaling={**CONFIG, "upscale_delay_s": 8})         # 2 s: the 1 s resync does
    deploy(store, "zero", autoscaling={**CONFIG, "min_replicas": 0, "upscale_delay_s": 8})
    deploy(store, "fixed", autoscaling=None)
    deploy(store, "idle")
    for name in ("fast", "slow", "fixed"):
        serving(client, 1, name)
    controller = leading(store, clock)
    controller.reconcile_once()
    assert controller.autoscaling.watched == ("fast", "zero") and controller.autoscaling.watch_s == WAKE_POLL_S
    assert controller.autoscaling.asleep == ("zero",)
    store.update_goal("zero", signed(lambda goal: {"options": {**goal.options, "autoscaling_config": None}}), "deploy")
    store.update_goal("fast", signed(lambda goal: {"options": {**goal.options, "autoscaling_config": None}}), "deploy")
    controller.reconcile_once()
    assert (controller.autoscaling.watched, controller.autoscaling.watch_s) == ((), None)


def test_the_wait_ends_when_an_autoscaling_delay_does(store, client):
    deploy(store)
    controller = Controller(store, resync_s=10)
    controller._lead(store.acquire_lease(controller.controller_id, 60))
    waiting(client, 4)
    controller.reconcile_once()
    assert controller.autoscaling.due is not None
    assert seconds_in_wait(controller, store) < 2, "the 0.5 s upscale delay, not the 10 s resync"
    controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 4


def test_autoscaling_turned_off_forgets_the_state_and_a_new_leader_cleans_up(store, client, clock, server):
    deploy(store)
    deploy(store, "other")
    controller = leading(store, clock)
    controller.reconcile_once()
    assert store.autoscale_state(NAME) is not None and store.autoscale_state("other") is not None

    deploy(store, autoscaling=None, num_replicas=2)
    controller.reconcile_once()
    assert store.autoscale_state(NAME) is None and NAME not in controller.autoscaling.scaling
    assert active(store) == 2

    # A state left behind (a leader died before it saw autoscaling turned off) goes too.
    client.set(Store.scale_key(NAME), '{"target": 4}')
    store.release_lease(controller.controller_id)
    successor = leading(Store(server.connect()), clock)
    successor.reconcile_once()
    assert store.autoscale_state(NAME) is None
    assert store.autoscale_state("other") is not None


def test_a_deleted_deployment_leaves_no_state(store, client, clock):
    deploy(store)
    controller = leading(store, clock)
    controller.reconcile_once()
    store.update_goal(NAME, signed(lambda previous: {"deleting": True}), "delete")
    for _ in range(2):
        controller.reconcile_once()
        for replica in store.replicas_of(NAME):
            store.update_replica(replica.replica_id, state=ReplicaState.STOPPED)
    assert store.get_goal(NAME) is None
    assert not client.exists(Store.scale_key(NAME)) and controller.autoscaling.scaling == {}


def test_an_unreadable_stored_state_starts_from_the_goal(store, client, clock, caplog):
    deploy(store)
    client.set(Store.scale_key(NAME), "{not json")
    controller = leading(store, clock)
    with caplog.at_level("ERROR", logger="taskserve.store"):
        controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 1
    assert "the autoscaling state of deployment model cannot be read" in caplog.text


def test_a_controller_that_lost_its_lease_records_no_decision(store, client, clock, server):
    deploy(store)
    controller = leading(store, clock)
    controller.reconcile_once()
    waiting(client, 8)
    clock.now += 0.2
    controller.reconcile_once()
    client.delete(Store.LEASE_KEY)
    Store(server.connect()).acquire_lease("controller-b", 60)
    clock.now += 0.5
    with pytest.raises(LeaseLost):
        controller.reconcile_once()
    assert store.autoscale_state(NAME).target == 1 and autoscale_lines(store) == []


def test_an_invalid_autoscaling_config_costs_only_its_deployment(store, client, clock):
    deploy(store, "fine")
    deploy(store, autoscaling={"min_replicas": 1, "max_replicas": 4})
    store.update_goal(NAME, signed(lambda previous: {"options": {**previous.options,
                                                                 "autoscaling_config": {"max_replicas": "many"}}}),
                      "deploy")
    controller = leading(store, clock)
    controller.reconcile_once()
    assert active(store, "fine") == 1
    assert "autoscaling_config['max_replicas']='many'" in store.get_health(NAME).message


def test_an_automatic_rollback_keeps_the_current_autoscaling(store, client, clock):
    deploy(store, autoscaling=None, num_replicas=2)
    failed = deploy(store, version="v2")
    controller = leading(store, clock)
    controller._roll_back(failed, "constructor failed 3 times", "Traceback ...")
    restored = store.get_goal(NAME)
    assert restored.version == "v1"
    assert restored.options["autoscaling_config"] == CONFIG and restored.num_replicas == 1
