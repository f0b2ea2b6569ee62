"""Unit tests of the node agent's pure plan (taskserve/node/plan.py), and of how the agent carries it out.

Plain tables for the rules (spawns, records without a process, drains and the
SIGKILL after the graceful timeout, exits: drained, crashed, failed starts,
processes without a record, agent restarts), hypothesis properties for the
invariants (one Reap per exited process, at most one Mark per replica, no Spawn
over a live process, SIGKILL only after the deadline, every exited process
restored, determinism) and a small simulated node. The last sections run
:class:`NodeAgent` actions against an in-memory store (an error on one replica
fails that replica and never the agent; the requests a dead replica held are put
back and counted), and its claim of the node id against fakeredis.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskserve.node.agent as agent_module
from taskserve.node.agent import ManagedProcess, NodeAgent
from taskserve.node.inflight import InflightFile
from taskserve.node.plan import (
    AGENT_RESTARTED,
    PROCESS_NOT_FOUND,
    Mark,
    ProcessView,
    Reap,
    Restore,
    Signal,
    Spawn,
    adopt,
    claim_verdict,
    heartbeat_interval,
    plan_node,
    renewed,
)
from taskserve.node.protocol import EXIT_CONSTRUCTOR_FAILED
from taskserve.state import Replica, ReplicaState, Resources
from taskserve.store import UNACKED_KEY, Store
from taskserve.store.keys import held_key, stream_key
from taskserve.wire import read_stream_entry

from .helpers import examples

PROPERTY = settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])

S = ReplicaState
NOW = 1000.0


# --------------------------------------------------------------------------- helpers


def rec(
    replica_id: str = "r1",
    state: ReplicaState = S.RUNNING,
    desired: str = "run",
    message: str = "",
    config: Optional[dict] = None,
) -> Replica:
    return Replica(
        replica_id=replica_id,
        deployment="model",
        spec_hash="spec",
        version="v1",
        node_id="node-a",
        state=state,
        desired=desired,
        message=message,
        config=json.dumps(config or {}),
    )


def proc(
    replica_id: str = "r1",
    exit_code: Optional[int] = None,
    drain_deadline: Optional[float] = None,
    killed: bool = False,
    graceful_timeout_s: float = 20.0,
) -> ProcessView:
    return ProcessView(replica_id, exit_code, drain_deadline, killed, graceful_timeout_s)


def marks(actions: list) -> list[Mark]:
    return [a for a in actions if isinstance(a, Mark)]


# --------------------------------------------------------------------------- records without a process


def test_pending_record_that_should_run_is_spawned():
    assert plan_node([rec(state=S.PENDING)], [], NOW) == [Spawn("r1")]


@pytest.mark.parametrize("replica_id", ["../../outside/escaped", "/etc/x", "..", ".hidden", "a/b", "a\x1b[31m",
                                        "", "x" * 129])
def test_a_pending_record_whose_id_is_not_a_file_name_fails_and_is_never_spawned(replica_id):
    # Its id would become <data dir>/logs/<id>.log: a record written by hand under
    # "../../outside/escaped" made the agent create a file outside its data dir.
    actions = plan_node([rec(replica_id, state=S.PENDING)], [], NOW)
    assert not [a for a in actions if isinstance(a, Spawn)]
    (mark,) = marks(actions)
    assert mark.state == S.FAILED and mark.failure == "start" and "invalid replica id" in mark.message


def test_a_pending_record_of_an_invalid_deployment_name_fails():
    record = replace(rec(state=S.PENDING), deployment="../model")
    (mark,) = plan_node([record], [], NOW)
    assert mark.state == S.FAILED and "invalid deployment name" in mark.message


def test_the_agent_builds_no_path_from_an_id_that_is_not_a_file_name(tmp_path):
    agent = NodeAgent.__new__(NodeAgent)
    agent.log_dir = tmp_path / "logs"
    assert agent.replica_file("echo-1a2b", ".log") == tmp_path / "logs" / "echo-1a2b.log"
    with pytest.raises(ValueError, match="invalid replica id"):
        agent.replica_file("../../outside/escaped", ".log")


@pytest.mark.parametrize("state", [S.STARTING, S.RUNNING, S.RECONFIGURING, S.DRAINING])
def test_record_alive_without_a_process_is_stopped(state):
    assert plan_node([rec(state=state)], [], NOW) == [Mark("r1", S.STOPPED, message=PROCESS_NOT_FOUND)]


@pytest.mark.parametrize("state", [S.STOPPED, S.FAILED])
def test_gone_record_that_should_run_is_left_to_the_controller(state):
    assert plan_node([rec(state=state)], [], NOW) == []


@pytest.mark.parametrize("state", [S.PENDING, S.STARTING, S.RUNNING, S.RECONFIGURING, S.DRAINING])
def test_record_asked_to_stop_without_a_process_is_stopped(state):
    # Its message is left as it is: only the state is written.
    assert plan_node([rec(state=state, desired="stop")], [], NOW) == [Mark("r1", S.STOPPED)]
    assert Mark("r1", S.STOPPED).fields() == {"state": S.STOPPED}


@pytest.mark.parametrize("state", [S.STOPPED, S.FAILED])
def test_gone_record_asked_to_stop_without_a_process_plans_nothing(state):
    assert plan_node([rec(state=state, desired="stop")], [], NOW) == []


# --------------------------------------------------------------------------- live processes


@pytest.mark.parametrize("state", list(ReplicaState))
def test_live_process_of_a_record_that_should_run_is_left_alone(state):
    assert plan_node([rec(state=state)], [proc()], NOW) == []
    assert plan_node([rec(state=state)], [proc(drain_deadline=NOW - 1)], NOW) == []


def test_stop_sends_sigterm_once_and_marks_draining():
    actions = plan_node([rec(desired="stop")], [proc(graceful_timeout_s=7.5)], NOW)
    assert actions == [Signal("r1", "term", NOW + 7.5), Mark("r1", S.DRAINING)]
    assert actions[1].fields() == {"state": S.DRAINING}


def test_stop_of_a_record_already_draining_only_signals():
    # The replica wrote DRAINING itself (Celery's shutdown began): no second write.
    assert plan_node([rec(state=S.DRAINING, desired="stop")], [proc()], NOW) == [Signal("r1", "term", NOW + 20)]


@pytest.mark.parametrize(
    "now, killed, expected",
    [
        (NOW - 0.001, False, []),                              # still within its graceful timeout
        (NOW, False, [Signal("r1", "kill", NOW)]),             # the deadline itself
        (NOW + 60, False, [Signal("r1", "kill", NOW)]),
        (NOW + 60, True, []),                                  # SIGKILL once
    ],
)
def test_draining_process_is_killed_after_its_graceful_timeout(now, killed, expected):
    draining = proc(drain_deadline=NOW, killed=killed)
    assert plan_node([rec(state=S.DRAINING, desired="stop")], [draining], now) == expected


def test_process_whose_record_is_gone_is_drained_without_a_record_write():
    assert plan_node([], [proc(graceful_timeout_s=5)], NOW) == [Signal("r1", "term", NOW + 5)]
    assert plan_node({}, [proc(drain_deadline=NOW + 5)], NOW) == []
    assert plan_node({}, [proc(drain_deadline=NOW + 5)], NOW + 5) == [Signal("r1", "kill", NOW + 5)]


# --------------------------------------------------------------------------- exits


def test_drained_process_that_exited_is_stopped():
    actions = plan_node([rec(state=S.DRAINING, desired="stop")], [proc(exit_code=0, drain_deadline=NOW)], NOW)
    assert actions == [Restore("r1"), Mark("r1", S.STOPPED, failure="", message=""), Reap("r1")]


@pytest.mark.parametrize(
    "exit_code, killed",
    [
        (-9, True),     # SIGKILLed after its graceful timeout, a request still running
        (1, False),     # crashed while it drained
        (0, False),     # exited cleanly: its in-flight file is empty, restoring costs nothing
    ],
)
def test_process_that_exits_while_draining_has_its_requests_restored(exit_code, killed):
    # A replica killed or crashing while DRAINING must not lose the request it held
    # (it used to be restored only if the process was not drained, or was killed).
    draining = proc(exit_code=exit_code, drain_deadline=NOW, killed=killed)
    actions = plan_node([rec(state=S.DRAINING, desired="stop")], [draining], NOW)
    assert actions[0] == Restore("r1")
    assert actions[1:] == [Mark("r1", S.STOPPED, failure="", message=""), Reap("r1")]


@pytest.mark.parametrize(
    "state, exit_code",
    [
        (S.RUNNING, EXIT_CONSTRUCTOR_FAILED),        # its first reconfigure raised
        (S.RECONFIGURING, EXIT_CONSTRUCTOR_FAILED),
        (S.STARTING, 1),                             # died while its constructor ran
        (S.STARTING, 0),
        (S.STARTING, -9),
        (S.PENDING, 1),                              # died before it wrote STARTING
        (S.FAILED, EXIT_CONSTRUCTOR_FAILED),         # it recorded its own traceback first
    ],
)
def test_process_that_never_served_is_a_failed_start(state, exit_code):
    actions = plan_node([rec(state=state)], [proc(exit_code=exit_code)], NOW)
    # The message (the replica's traceback, or its log's tail) is the agent's to read.
    assert actions == [Restore("r1"), Mark("r1", S.FAILED, failure="start", message_from_log=True), Reap("r1")]
    assert "message" not in actions[1].fields()


@pytest.mark.parametrize("state", [S.RUNNING, S.RECONFIGURING, S.DRAINING])
@pytest.mark.parametrize("exit_code", [1, 0, -9, -11, 137])
def test_process_that_served_and_exited_undrained_is_a_crash(state, exit_code):
    actions = plan_node([rec(state=state)], [proc(exit_code=exit_code)], NOW)
    assert actions == [
        Restore("r1"),
        Mark("r1", S.FAILED, failure="crash", message=f"replica process exited with code {exit_code}"),
        Reap("r1"),
    ]


def test_process_that_exits_before_its_drain_began_is_a_crash_not_a_stop():
    # Asked to stop, but it died before the agent sent SIGTERM: nothing else is planned for it.
    actions = plan_node([rec(desired="stop")], [proc(exit_code=1)], NOW)
    assert actions == [Restore("r1"), Mark("r1", S.FAILED, failure="crash",
                                             message="replica process exited with code 1"), Reap("r1")]


def test_exited_process_without_a_record_is_restored_and_reaped_only():
    assert plan_node([], [proc(exit_code=-9, drain_deadline=NOW, killed=True)], NOW) == [Restore("r1"), Reap("r1")]
    assert plan_node([], [proc(exit_code=1)], NOW) == [Restore("r1"), Reap("r1")]


# --------------------------------------------------------------------------- agent restart


def test_adopt_stops_every_record_left_by_an_earlier_agent():
    records = [rec("a", S.RUNNING), rec("b", S.STARTING), rec("c", S.DRAINING, desired="stop"),
               rec("d", S.PENDING), rec("e", S.STOPPED), rec("f", S.FAILED)]
    assert adopt(records) == [Mark(i, S.STOPPED, message=AGENT_RESTARTED) for i in "abcd"]


def test_adopt_keeps_records_this_agent_has_a_process_for():
    assert adopt([rec("a"), rec("b")], [proc("a")]) == [Mark("b", S.STOPPED, message=AGENT_RESTARTED)]


def test_after_an_agent_restart_the_records_are_left_to_the_controller():
    records = [rec("a", S.RUNNING), rec("b", S.DRAINING, desired="stop")]
    adopted = {m.replica_id: replace(next(r for r in records if r.replica_id == m.replica_id), state=m.state)
               for m in adopt(records)}
    assert plan_node(adopted, [], NOW) == []


# --------------------------------------------------------------------------- several replicas


def test_a_mixed_node_is_planned_replica_by_replica_in_id_order():
    records = {
        "d": rec("d", S.RUNNING, desired="stop"),
        "a": rec("a", S.PENDING),
        "c": rec("c", S.RUNNING),
        "b": rec("b", S.STARTING),
    }
    processes = [proc("e", drain_deadline=NOW - 1), proc("d"), proc("c", exit_code=-11)]
    assert plan_node(records, processes, NOW) == [
        Spawn("a"),
        Mark("b", S.STOPPED, message=PROCESS_NOT_FOUND),
        Restore("c"),
        Mark("c", S.FAILED, failure="crash", message="replica process exited with code -11"),
        Reap("c"),
        Signal("d", "term", NOW + 20),
        Mark("d", S.DRAINING),
        Signal("e", "kill", NOW - 1),
    ]
    # A list, a dict or another order of the same inputs: the same plan.
    assert plan_node(list(reversed(records.values())), {p.replica_id: p for p in processes}, NOW) \
        == plan_node(records, processes, NOW)


def test_empty_node_plans_nothing():
    assert plan_node([], [], NOW) == []
    assert adopt([]) == []


# --------------------------------------------------------------------------- properties

IDS = [f"r{i}" for i in range(8)]


@st.composite
def nodes(draw) -> tuple[list[Replica], list[ProcessView], float]:
    """Any records and processes an agent could hold, and a time."""
    now = draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    records, processes = [], []
    for replica_id in IDS:
        if draw(st.booleans()):
            records.append(rec(replica_id, draw(st.sampled_from(list(ReplicaState))),
                               draw(st.sampled_from(["run", "stop"]))))
        if draw(st.booleans()):
            deadline = draw(st.none() | st.floats(min_value=0, max_value=100, allow_nan=False))
            processes.append(proc(
                replica_id,
                exit_code=draw(st.none() | st.sampled_from([0, 1, EXIT_CONSTRUCTOR_FAILED, -9, -15])),
                drain_deadline=deadline,
                killed=deadline is not None and draw(st.booleans()),
                graceful_timeout_s=draw(st.floats(min_value=0, max_value=60, allow_nan=False)),
            ))
    return records, processes, now


@given(node=nodes())
@PROPERTY
def test_property_every_exited_process_is_restored_then_reaped_once(node):
    records, processes, now = node
    actions = plan_node(records, processes, now)
    record_ids = {r.replica_id for r in records}
    for process in processes:
        mine = [a for a in actions if a.replica_id == process.replica_id]
        reaps = [a for a in mine if isinstance(a, Reap)]
        restores = [a for a in mine if isinstance(a, Restore)]
        if process.exited:
            assert len(reaps) == 1 and len(restores) == 1, mine
            # Restored while the agent still holds its in-flight file; reaped last.
            assert mine[0] == Restore(process.replica_id) and mine[-1] == Reap(process.replica_id)
            assert len(marks(mine)) == (1 if process.replica_id in record_ids else 0)
            assert not any(isinstance(a, (Spawn, Signal)) for a in mine)
        else:
            assert not reaps and not restores


@given(node=nodes())
@PROPERTY
def test_property_at_most_one_mark_per_replica_and_only_for_records(node):
    records, processes, now = node
    actions = plan_node(records, processes, now)
    marked = [m.replica_id for m in marks(actions)]
    assert len(marked) == len(set(marked))
    assert set(marked) <= {r.replica_id for r in records}
    assert {a.replica_id for a in actions} <= {r.replica_id for r in records} | {p.replica_id for p in processes}


@given(node=nodes())
@PROPERTY
def test_property_spawn_only_for_pending_records_without_a_process(node):
    records, processes, now = node
    by_id = {r.replica_id: r for r in records}
    with_process = {p.replica_id for p in processes}
    for action in plan_node(records, processes, now):
        if isinstance(action, Spawn):
            assert action.replica_id not in with_process
            record = by_id[action.replica_id]
            assert record.desired == "run" and record.state == S.PENDING


@given(node=nodes())
@PROPERTY
def test_property_signals_follow_the_drain_rules(node):
    records, processes, now = node
    by_id = {r.replica_id: r for r in records}
    by_process = {p.replica_id: p for p in processes}
    for action in plan_node(records, processes, now):
        if not isinstance(action, Signal):
            continue
        process = by_process[action.replica_id]
        record = by_id.get(action.replica_id)
        assert not process.exited
        assert record is None or record.desired == "stop", "a replica that should run is never signalled"
        if action.kind == "kill":
            assert process.drain_deadline is not None and now >= process.drain_deadline and not process.killed
            assert action.drain_deadline == process.drain_deadline
        else:
            assert process.drain_deadline is None
            assert action.drain_deadline == now + process.graceful_timeout_s


@given(node=nodes())
@PROPERTY
def test_property_every_undrained_process_to_stop_gets_sigterm(node):
    records, processes, now = node
    by_id = {r.replica_id: r for r in records}
    terms = {a.replica_id for a in plan_node(records, processes, now) if isinstance(a, Signal) and a.kind == "term"}
    for process in processes:
        record = by_id.get(process.replica_id)
        should_stop = record is None or record.desired == "stop"
        assert (process.replica_id in terms) == (should_stop and not process.exited and not process.draining)


@given(node=nodes(), data=st.data())
@PROPERTY
def test_property_plan_is_deterministic_order_free_and_pure(node, data):
    records, processes, now = node
    records_before, processes_before = copy.deepcopy(records), copy.deepcopy(processes)
    first = plan_node(records, processes, now)
    assert records == records_before and processes == processes_before
    assert plan_node(records, processes, now) == first
    shuffled_records = data.draw(st.permutations(records))
    shuffled_processes = data.draw(st.permutations(processes))
    assert plan_node({r.replica_id: r for r in shuffled_records}, shuffled_processes, now) == first


@given(node=nodes())
@PROPERTY
def test_property_adopt_stops_exactly_the_live_records_without_process(node):
    records, processes, _ = node
    adopted = adopt(records, processes)
    with_process = {p.replica_id for p in processes}
    assert {m.replica_id for m in adopted} == {
        r.replica_id for r in records if not r.is_gone and r.replica_id not in with_process
    }
    assert all(m == Mark(m.replica_id, S.STOPPED, message=AGENT_RESTARTED) for m in adopted)


# --------------------------------------------------------------------------- simulated node


class SimNode:
    """Records and processes that follow the actions: a process ignores SIGTERM for
    ``ignores_term`` steps, and dies at once on SIGKILL."""

    def __init__(self, records: list[Replica], ignores_term: dict[str, int], timeout: float) -> None:
        self.records = {r.replica_id: r for r in records}
        self.processes: dict[str, ProcessView] = {}
        self.patience = dict(ignores_term)
        self.timeout = timeout
        self.kills: dict[str, int] = {}
        self.restored: list[str] = []

    def step(self, now: float) -> list:
        actions = plan_node(self.records, self.processes, now)
        for action in actions:
            rid = action.replica_id
            if isinstance(action, Spawn):
                self.processes[rid] = proc(rid, graceful_timeout_s=self.timeout)
                self.records[rid] = replace(self.records[rid], state=S.STARTING)
            elif isinstance(action, Signal) and action.kind == "term":
                self.processes[rid] = replace(self.processes[rid], drain_deadline=action.drain_deadline)
            elif isinstance(action, Signal):
                self.kills[rid] = self.kills.get(rid, 0) + 1
                self.processes[rid] = replace(self.processes[rid], killed=True, exit_code=-9)
            elif isinstance(action, Mark):
                self.records[rid] = replace(self.records[rid], state=action.state)
            elif isinstance(action, Restore):
                self.restored.append(rid)
            elif isinstance(action, Reap):
                del self.processes[rid]
        # Time passes: started processes serve; drained ones exit once their patience is over.
        for rid, process in list(self.processes.items()):
            if process.exited:
                continue
            if process.draining:
                self.patience[rid] = self.patience.get(rid, 0) - 1
                if self.patience[rid] < 0:
                    self.processes[rid] = replace(process, exit_code=0)
            elif self.records.get(rid) is not None and self.records[rid].state == S.STARTING:
                self.records[rid] = replace(self.records[rid], state=S.RUNNING)
        return actions


@given(
    count=st.integers(min_value=1, max_value=6),
    patience=st.lists(st.integers(min_value=0, max_value=30), min_size=6, max_size=6),
    timeout=st.sampled_from([0.0, 1.0, 5.0]),
)
@settings(max_examples=examples(40), deadline=None)
def test_simulated_node_starts_then_drains_every_replica(count, patience, timeout):
    ids = [f"r{i}" for i in range(count)]
    node = SimNode([rec(i, S.PENDING) for i in ids], dict(zip(ids, patience)), timeout)
    now = 0.0
    for _ in range(3):
        node.step(now)
        now += 1.0
    assert all(r.state == S.RUNNING for r in node.records.values())
    for rid in ids:
        node.records[rid] = replace(node.records[rid], desired="stop")
    for _ in range(int(timeout) + 5):
        node.step(now)
        now += 1.0
    assert node.processes == {}
    assert all(r.state == S.STOPPED for r in node.records.values())
    assert all(kills == 1 for kills in node.kills.values())
    # Killed or not, each process's requests were put back once.
    assert sorted(node.restored) == sorted(ids)
    # Once converged, nothing more to do.
    assert node.step(now) == []


# --------------------------------------------------------------------------- the agent carries the plan out


class FakeStore:
    """The parts of :class:`taskserve.store.Store` the agent's actions use, in memory."""

    def __init__(self, records: list[Replica]) -> None:
        self.records = {r.replica_id: r.to_fields() for r in records}
        self.writes: list[tuple[str, dict]] = []
        self.down = False

    def update_replica(self, replica_id: str, **fields: object) -> bool:
        if self.down:
            raise redis.ConnectionError("Connection refused")
        self.writes.append((replica_id, fields))
        if replica_id not in self.records:
            return False
        self.records[replica_id].update({k: str(getattr(v, "value", v)) for k, v in fields.items()})
        return True

    def get_replica(self, replica_id: str) -> Optional[Replica]:
        fields = self.records.get(replica_id)
        return Replica.from_fields(fields) if fields else None

    def notify(self, what: str) -> None:
        pass

    def get_code(self, sha: str) -> bytes:
        raise KeyError(f"no code {sha!r} in this fake store")


def make_agent(store: FakeStore, tmp_path: Path) -> NodeAgent:
    agent = NodeAgent(store, "redis://127.0.0.1:1/0", node_id="node-a", resources=Resources(4, 0, 2**30),
                      data_dir=tmp_path)
    agent.log_dir.mkdir(parents=True)
    return agent


def test_a_spawn_that_raises_fails_its_replica_not_the_agent(tmp_path, caplog, monkeypatch):
    # An env var named "A=B" makes Popen raise before any process starts. (Its code is
    # taken as signed: tests/test_security.py covers the signature check.)
    monkeypatch.setattr(agent_module, "check_assignment", lambda *args: None)
    bad = rec("bad", S.PENDING, config={"runtime_env": {"env_vars": {"A=B": "1"}}})
    stop = rec("other", S.RUNNING, desired="stop")
    store = FakeStore([bad, stop])
    agent = make_agent(store, tmp_path)
    records = {r.replica_id: r for r in (bad, stop)}
    with caplog.at_level(logging.ERROR, logger="taskserve.node.agent"):
        changed = agent._carry_out(plan_node(records, [], NOW), records)
    assert changed
    failed = store.get_replica("bad")
    assert failed.state == S.FAILED and failed.failure == "start"
    assert failed.message.startswith("could not start the replica process: ValueError")
    assert "\n" not in failed.message
    assert any(r.exc_info for r in caplog.records), "logged with its traceback"
    # The next replica's action still ran.
    assert store.get_replica("other").state == S.STOPPED
    assert agent.processes == {}


def test_a_malformed_record_config_fails_that_replica(tmp_path):
    broken = replace(rec("broken", S.PENDING), config="{not json")
    store = FakeStore([broken])
    agent = make_agent(store, tmp_path)
    agent._carry_out([Spawn("broken")], {"broken": broken})
    assert store.get_replica("broken").state == S.FAILED
    assert store.get_replica("broken").failure == "start"
    assert "JSONDecodeError" in store.get_replica("broken").message


def test_a_redis_error_while_acting_is_left_to_the_loop(tmp_path):
    store = FakeStore([rec("r1", S.RUNNING)])
    store.down = True
    agent = make_agent(store, tmp_path)
    with pytest.raises(redis.RedisError):
        agent._carry_out([Mark("r1", S.STOPPED, message=PROCESS_NOT_FOUND)], {})


def test_a_failed_start_takes_the_replicas_own_message_else_its_log(tmp_path):
    store = FakeStore([rec("own", S.FAILED, message="Traceback ...\nRuntimeError: no weights"), rec("quiet", S.STARTING)])
    agent = make_agent(store, tmp_path)
    (agent.log_dir / "quiet.log").write_text("booting\nSegmentation fault\n")
    agent._carry_out([Mark("own", S.FAILED, failure="start", message_from_log=True),
                      Mark("quiet", S.FAILED, failure="start", message_from_log=True)], {})
    assert store.get_replica("own").message == "Traceback ...\nRuntimeError: no weights"
    assert store.get_replica("quiet").message == "booting\nSegmentation fault"
    assert store.get_replica("quiet").failure == "start"


def unacked_entry(task_id: str, tag: str) -> str:
    """kombu's entry of an unacknowledged message: ``[payload, exchange, routing_key]``."""
    payload = {"body": "W10=", "headers": {"id": task_id, "task": "taskserve.call"},
               "properties": {"correlation_id": task_id, "delivery_tag": tag}}
    return json.dumps([payload, "", "taskserve.echo"])


class RestoringStore(FakeStore):
    """A fake store whose putting back of what a replica held is the real store's, on fakeredis."""

    def __init__(self) -> None:
        super().__init__([])
        self.real = Store(fakeredis.FakeRedis())
        self.redis = self.real.redis

    def restore_held(self, *args, **kwargs):
        return self.real.restore_held(*args, **kwargs)

    def end_stream(self, *args, **kwargs):
        return self.real.end_stream(*args, **kwargs)


def test_the_requests_a_dead_replica_held_are_put_back_and_counted(tmp_path):
    store = RestoringStore()
    client = store.redis
    client.hset(UNACKED_KEY, mapping={"tag-1": unacked_entry("task-1", "tag-1"),
                                    "tag-2": unacked_entry("task-2", "tag-2"),
                                    "tag-4": unacked_entry("task-4", "tag-4")})
    client.sadd(held_key("r1"), "tag-4")  # taken, its tag not yet in the in-flight file
    agent = make_agent(store, tmp_path)
    inflight_path = agent.log_dir / "r1.inflight"
    held = InflightFile(str(inflight_path))
    held.add("task-1", "tag-1")
    held.add("task-2", "tag-2")
    held.add("task-3", "tag-3")          # acknowledged meanwhile: nothing to put back, nor to count
    process = ManagedProcess("r1", "echo", popen=None, log_file=None, inflight_path=inflight_path,
                             graceful_timeout_s=1.0)
    agent._restore_inflight(process)
    back = sorted(json.loads(item)["headers"]["id"] for item in client.lrange("taskserve.echo", 0, -1))
    assert back == ["task-1", "task-2", "task-4"] and client.hlen(UNACKED_KEY) == 0
    assert [store.real.redeliveries(f"task-{n}") for n in (1, 2, 3, 4)] == [1, 1, 0, 1]
    assert not client.exists(held_key("r1"))


def test_a_replica_killed_for_not_draining_hands_back_without_counting(tmp_path):
    store = RestoringStore()
    store.redis.hset(UNACKED_KEY, "tag-1", unacked_entry("task-1", "tag-1"))
    agent = make_agent(store, tmp_path)
    inflight_path = agent.log_dir / "r1.inflight"
    InflightFile(str(inflight_path)).add("task-1", "tag-1")
    process = ManagedProcess("r1", "echo", popen=None, log_file=None, inflight_path=inflight_path,
                             graceful_timeout_s=1.0, killed=True)
    agent._restore_inflight(process)
    assert store.redis.llen("taskserve.echo") == 1 and store.real.redeliveries("task-1") == 0


def test_a_stream_its_replica_died_under_is_ended_not_run_again(tmp_path):
    store = RestoringStore()
    entry = json.loads(unacked_entry("task-1", "tag-1"))
    entry[0]["headers"]["taskserve"] = {"stream": 1}
    store.redis.hset(UNACKED_KEY, "tag-1", json.dumps(entry))
    agent = make_agent(store, tmp_path)
    inflight_path = agent.log_dir / "r1.inflight"
    InflightFile(str(inflight_path)).add("task-1", "tag-1")
    agent._restore_inflight(ManagedProcess("r1", "echo", popen=None, log_file=None, inflight_path=inflight_path,
                                           graceful_timeout_s=1.0))
    assert store.redis.llen("taskserve.echo") == 0 and store.redis.hlen(UNACKED_KEY) == 0
    [(_, fields)] = store.redis.xrange(stream_key("task-1"))
    _, end = read_stream_entry(fields)
    assert "stream interrupted" in str(end.error)
    assert store.redis.ttl(stream_key("task-1")) > 0        # the end made the stream: it expires all the same


def test_a_replica_that_held_nothing_counts_nothing(tmp_path):
    store = RestoringStore()
    agent = make_agent(store, tmp_path)
    process = ManagedProcess("r1", "echo", popen=None, log_file=None, inflight_path=agent.log_dir / "none.inflight",
                             graceful_timeout_s=1.0)
    agent._restore_inflight(process)
    assert store.redis.keys("*") == []


# --------------------------------------------------------------------------- the node id


@pytest.mark.parametrize(
    "same_host, pid_running, verdict",
    [
        (True, True, "refuse"),      # its agent runs here: a second agent for the node
        (True, False, "replace"),    # its agent died: restart at once
        (False, None, "wait"),       # another host: live if it renews its claim
    ],
)
def test_claim_verdict(same_host, pid_running, verdict):
    assert claim_verdict(same_host, pid_running) == verdict


def test_a_claim_is_renewed_when_its_ttl_goes_up_not_when_it_runs_down():
    assert renewed(1500, 1440, 0.05) is False
    assert renewed(1500, 1999, 0.05) is True
    assert renewed(1500, 0, 0.05) is False
    assert (heartbeat_interval(10), heartbeat_interval(2), heartbeat_interval(0.4)) == (1.0, 0.5, 0.1)


@pytest.fixture
def fake_redis_store():
    import fakeredis

    from taskserve.store import Store

    if not _lua_works(fakeredis):
        pytest.skip("fakeredis runs Lua scripts only with the lupa package")
    return Store(fakeredis.FakeRedis())


def _lua_works(fakeredis) -> bool:
    try:
        fakeredis.FakeRedis().eval("return 1", 0)
    except redis.ResponseError:
        return False
    return True


def node_agent(store, tmp_path: Path, ttl_s: float = 2.0) -> NodeAgent:
    return NodeAgent(store, "redis://127.0.0.1:1/0", node_id="node-a", resources=Resources(4, 0, 2**30),
                     data_dir=tmp_path, heartbeat_ttl_s=ttl_s)


def test_a_malformed_record_of_the_node_is_failed_and_the_others_are_read(fake_redis_store, tmp_path):
    from taskserve.store import Store

    for replica_id in ("bad", "good"):
        fake_redis_store.create_replica(rec(replica_id, S.RUNNING))
    fake_redis_store.redis.hset(Store.replica_key("bad"), "state", "HIBERNATING")
    agent = node_agent(fake_redis_store, tmp_path)
    assert list(agent._records()) == ["good"]
    failed = fake_redis_store.get_replica("bad")
    assert (failed.state, failed.failure) == (S.FAILED, "start")
    assert failed.message == "malformed replica record: RecordError: state is not a replica state: 'HIBERNATING'"


def test_a_second_agent_for_a_node_whose_agent_runs_here_is_refused_at_once(fake_redis_store, tmp_path,
                                                                          monkeypatch):
    from taskserve.store import NodeTaken

    first = node_agent(fake_redis_store, tmp_path / "a")
    first.take_node()
    first_record = fake_redis_store.list_nodes()
    second = node_agent(fake_redis_store, tmp_path / "b")
    second.claim = replace(second.claim, pid=first.claim.pid + 1, token="second")
    monkeypatch.setattr(agent_module, "_agent_running", lambda pid: pid == first.claim.pid)
    with pytest.raises(NodeTaken, match=r"^node node-a already has a live agent \(pid \d+ on .+\); "
                                        r"stop it or pick another --node-id$"):
        second.take_node()
    assert fake_redis_store.list_nodes() == first_record
    assert fake_redis_store.heartbeat_node("node-a", 2.0, first.claim) is True


def test_an_agent_whose_previous_process_is_gone_takes_the_node_at_once(fake_redis_store, tmp_path, monkeypatch):
    dead = node_agent(fake_redis_store, tmp_path / "a", ttl_s=60)
    dead.take_node()
    restarted = node_agent(fake_redis_store, tmp_path / "b")
    restarted.claim = replace(restarted.claim, pid=dead.claim.pid + 1, token="restarted")
    monkeypatch.setattr(agent_module, "_agent_running", lambda pid: False)
    restarted.take_node()
    assert fake_redis_store.node_claim("node-a")[0] == restarted.claim


def test_an_agent_waits_for_the_claim_of_another_host_to_expire(fake_redis_store, tmp_path):
    from taskserve.store import NodeClaim

    elsewhere = NodeClaim(pid=7, host="other-host", token="gone")
    fake_redis_store.register_node(replace(node_agent(fake_redis_store, tmp_path).node, agent_pid=7),
                                   ttl_s=0.3, claim=elsewhere)
    agent = node_agent(fake_redis_store, tmp_path)
    agent.take_node()                    # the claim was not renewed: it expired
    assert fake_redis_store.node_claim("node-a")[0] == agent.claim


def test_an_agent_refuses_a_node_another_host_keeps_renewing(fake_redis_store, tmp_path, monkeypatch):
    from taskserve.store import NodeClaim, NodeTaken

    elsewhere = NodeClaim(pid=7, host="other-host", token="live")
    fake_redis_store.register_node(node_agent(fake_redis_store, tmp_path).node, ttl_s=2, claim=elsewhere)
    real_claim = fake_redis_store.node_claim

    def heartbeating(node_id):
        fake_redis_store.heartbeat_node(node_id, 2, elsewhere)     # the other agent renews it meanwhile
        return real_claim(node_id)

    agent = node_agent(fake_redis_store, tmp_path)
    monkeypatch.setattr(fake_redis_store, "node_claim", heartbeating)
    with pytest.raises(NodeTaken, match="pid 7 on other-host"):
        agent.take_node()


def test_the_heartbeat_thread_registers_the_node_again_after_it_expired(fake_redis_store, tmp_path):
    import threading

    from taskserve.store import Store

    from .helpers import wait_until

    agent = node_agent(fake_redis_store, tmp_path, ttl_s=0.4)
    agent.take_node()
    thread = threading.Thread(target=agent._heartbeat_loop, daemon=True)
    thread.start()
    try:
        fake_redis_store.redis.delete(Store.node_alive_key("node-a"))     # Redis restarted without it
        wait_until(lambda: fake_redis_store.node_claim("node-a")[0] == agent.claim, timeout=5,
                   message="the node to be registered again")
        assert fake_redis_store.list_nodes()[0].alive
    finally:
        agent.left.set()
        thread.join(timeout=5)
