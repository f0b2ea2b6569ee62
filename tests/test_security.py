"""Security: each measure of docs/security.md, tried as an attack and seen refused.

Signed code (missing, wrong, or paired with options it was not signed with), the
password of `taskserve up`'s Redis and where it must never show, TLS and Sentinel
addresses, and the dashboard showing hostile text as text.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import fakeredis
import httpx
import pytest
import redis

import taskserve
from taskserve.celery_app import make_app
from taskserve.code import pack, sign, unpack
from taskserve.connection import cluster_secret, find_cluster, parse_sentinel, redis_client
from taskserve.controller import Controller
from taskserve.errors import SecretNotConfigured, SignatureError, redact_text
from taskserve.gateway.app import read_routes
from taskserve.redis_server import RedisServer, find_redis_server, free_port, generate_password
from taskserve.signing import (
    GOAL_NOT_SIGNED,
    SECRET_ENV,
    ClusterSecret,
    check_goal,
    check_user_config,
    ensure_secret_file,
    manifest,
    read_secret_file,
    seal,
    sign_goal,
    sign_user_config,
    unseal,
)
from taskserve.state import DeploymentState, Goal, Node, ReplicaState, Resources, config_hash
from taskserve.store import EVENTS_CHANNEL, Store, queue_name, result_key
from taskserve.wire import PICKLED_RESULT

from .helpers import REPO, Cluster, replica_pids, running_gateway, signed, start_cluster, wait_until
from .helpers import SECRET as RUN_SECRET  # the test run's, which the clusters and signed() use

SECRET = ClusterSecret.parse("the-right-secret")


class Marker:
    """Unpickling it runs a command: what an attacker would put in Redis."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ------------------------------------------------------------------ signing, unit


def test_unsigned_wrong_and_tampered_blobs_are_refused_before_unpickling(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps((Marker(marker), b""))
    with pytest.raises(SignatureError, match="not signed"):
        unpack(evil, SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        unpack(sign(evil, {"deployment": "x"}, ClusterSecret.parse("an-attackers-guess"))[1], SECRET)
    _, good = sign(pack(len, (), {})[1], {"deployment": "x"}, SECRET)
    tampered = good[:-10] + evil[-10:]
    with pytest.raises(SignatureError, match="does not match"):
        unpack(tampered, SECRET)
    assert not marker.exists()
    assert unpack(good, SECRET)[0] is len


def test_signed_code_paired_with_other_options_is_refused():
    config = {"kind": "class", "serializer": "json", "runtime_env": {"env_vars": {"A": "1"}}}
    _, blob = sign(pack(len, (), {})[1], manifest("model", config), SECRET)
    for change in ({"serializer": "pickle"}, {"runtime_env": {"env_vars": {"PYTHONPATH": "/tmp/evil"}}},
                   {"runtime_env": {"pip": ["evil"], "env_vars": {"A": "1"}}}, {"kind": "function"}):
        with pytest.raises(SignatureError, match="refused"):
            unpack(blob, SECRET, manifest("model", {**config, **change}))
    with pytest.raises(SignatureError, match="deployment"):
        unpack(blob, SECRET, manifest("other", config))


def test_rotation_old_secret_still_verifies_while_listed():
    sealed_with_old = seal(b"payload", {}, ClusterSecret.parse("old"))
    assert unseal(sealed_with_old, ClusterSecret.parse("new,old"))[1] == b"payload"
    assert unseal(seal(b"p", {}, ClusterSecret.parse("new,old")), ClusterSecret.parse("new"))[1] == b"p"
    with pytest.raises(SignatureError):
        unseal(sealed_with_old, ClusterSecret.parse("new"))


def test_secret_file_is_private_and_kept(tmp_path):
    path = tmp_path / "data" / "secret"
    first = ensure_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and ensure_secret_file(path) == first
    path.chmod(0o644)
    with pytest.raises(SecretNotConfigured, match="chmod 600"):
        read_secret_file(path)


def test_a_client_without_a_secret_is_told_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TASKSERVE_SECRET", raising=False)
    monkeypatch.delenv("TASKSERVE_SECRET_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SecretNotConfigured, match=r"set \$TASKSERVE_SECRET") as caught:
        cluster_secret("redis://:pw-123@127.0.0.1:1/0")
    assert "pw-123" not in str(caught.value)


# ------------------------------------------------------------------ addresses, unit


def test_passwords_are_redacted_from_any_text():
    text = redact_text("tried redis://:hunter2@h:1/0, rediss://u:hunter2@h:2/0?ssl_cert_reqs=none and "
                       "sentinel://:hunter2@a:26379;sentinel://:hunter2@b:26379/0?master_name=m")
    assert "hunter2" not in text and "rediss://u@h:2/0?ssl_cert_reqs=none" in text


def test_rediss_without_options_verifies_against_the_system_ca_store():
    client = redis_client("rediss://:pw@cache.example:6380/0")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] in ("required", "CERT_REQUIRED") or str(kwargs["ssl_cert_reqs"]).endswith("REQUIRED")
    assert kwargs.get("ssl_ca_certs") is None          # None: the system's store
    app = make_app("rediss://:pw@cache.example:6380/0")
    import ssl
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED   # Celery refused this URL before
    custom = make_app("rediss://cache.example:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem")
    assert custom.backend.connparams["ssl_cert_reqs"] == ssl.CERT_NONE
    assert custom.backend.connparams["ssl_ca_certs"] == "/etc/ca.pem"


def test_sentinel_addresses_are_accepted_everywhere():
    url = "sentinel://:pw@127.0.0.1:26379;sentinel://:pw@127.0.0.1:26380/3?master_name=cache"
    assert find_cluster(url).url == url
    parsed = parse_sentinel(url)
    assert parsed.master_name == "cache" and parsed.db == 3 and len(parsed.sentinels) == 2
    app = make_app(url)
    assert app.conf.broker_transport_options["master_name"] == "cache"
    assert app.conf.result_backend_transport_options["master_name"] == "cache"
    assert type(app.backend).__name__ == "SentinelBackend"


@pytest.mark.slow
@pytest.mark.integration
def test_sentinel_reaches_the_master_through_a_real_sentinel(tmp_path):
    password = generate_password()
    with RedisServer(password=password) as master:
        sentinel_port = RedisServer().port
        config = tmp_path / "sentinel.conf"
        config.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor cache 127.0.0.1 {master.port} 1\n"
                          f"sentinel auth-pass cache {password}\n")
        config.chmod(0o600)
        process = subprocess.Popen([find_redis_server(), str(config), "--sentinel"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"sentinel://:{password}@127.0.0.1:{sentinel_port}/0?master_name=cache"

            def answers() -> bool:
                try:
                    return redis_client(url, socket_timeout=2).ping()
                except redis.RedisError:
                    return False

            wait_until(answers, timeout=20, message="Sentinel to name the master")
            store = taskserve.connection.make_store(url)
            store.redis.set("taskserve-sentinel-test", "1")
            assert redis.Redis.from_url(master.url).get("taskserve-sentinel-test") == b"1"
            backend = make_app(url).backend
            backend.set("k", "v")
            assert backend.get("k") in ("v", b"v")
        finally:
            process.terminate()
            process.wait(timeout=10)


# ------------------------------------------------------------------ signed code, with real replicas


class Greeter:
    def __call__(self, name):
        return f"hi {name}"


def _attack(cluster: Cluster, name: str, blob: bytes, **changes) -> str:
    """Write a goal running ``blob``; the message of the replica it made fail (the
    controller records it when it gives up and restores the previous version).

    The goal is signed, as though its writer had the secret: one that is not is refused
    before any replica sees it (test_a_goal_rewritten_without_the_secret_...), and this
    tries the layer below, the replica's own check of its code."""
    import hashlib

    store = taskserve.connect(cluster.url)
    sha = hashlib.sha256(blob).hexdigest()
    goal = store.update_goal(name, signed(lambda previous: {"code_sha": sha, "spec_hash": "attack",
                                                            "version": "attack", **changes}),
                             "deploy", blobs=[(sha, blob)])

    def refused() -> str:
        return next((entry["error"] for entry in store.history(name)
                     if entry.get("rollback_of") == goal.generation), "")

    return wait_until(refused, timeout=60, message="the attacked replica to fail and the version to be restored")


def test_replicas_refuse_unsigned_and_wrongly_signed_code_and_keep_serving(connected, unique_name, tmp_path):
    model = taskserve.deployment(name=unique_name, version="1")(Greeter)
    model.deploy()
    handle = model.get_handle()
    marker = tmp_path / "ran"
    evil = pickle.dumps((Marker(marker), b""))

    message = _attack(connected, unique_name, evil)
    assert "not signed" in message and "\n" not in message
    assert not marker.exists()

    _, wrong = sign(evil, manifest(unique_name, {"kind": "class"}), ClusterSecret.parse("guessed"))
    message = _attack(connected, unique_name, wrong)
    assert "does not match" in message and "\n" not in message
    assert not marker.exists()
    # Refused, not retried forever: the rollout gives up and the signed version serves on.
    wait_until(lambda: taskserve.get_deployment(unique_name).version == "1", timeout=90,
               message="the previous version to be restored")
    assert handle.remote("ann").result(timeout=30) == "hi ann"


def test_signed_code_with_injected_options_starts_nothing(connected, unique_name, tmp_path):
    model = taskserve.deployment(name=unique_name, version="1")(Greeter)
    model.deploy()
    store = taskserve.connect(connected.url)
    goal = store.require_goal(unique_name)
    blob = store.get_code(goal.code_sha)        # the real, signed code
    injected = {**goal.options, "runtime_env": {"env_vars": {"PYTHONPATH": str(tmp_path)}}}
    (tmp_path / "sitecustomize.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    message = _attack(connected, unique_name, blob, options=injected)
    assert "runtime_env" in message and "refused" in message
    assert not (tmp_path / "ran").exists()


def test_a_redeploy_ships_code_again_that_is_not_sealed_with_this_secret(connected, unique_name):
    # As after an upgrade from an unsigned taskserve, or a rotated secret: the stored code
    # no longer verifies, so "same version, same options" is not taken as nothing to do.
    model = taskserve.deployment(name=unique_name, version="1")(Greeter)
    model.deploy()
    store = taskserve.connect(connected.url)
    goal = store.require_goal(unique_name)
    payload = unseal(store.get_code(goal.code_sha), cluster_secret())[1]
    foreign_sha, foreign = sign(payload, manifest(unique_name, {**goal.options, "kind": "class"}),
                                ClusterSecret.parse("another-clusters-secret"))
    store.redis.set(store.code_key(foreign_sha), foreign)
    record = json.loads(store.redis.get(store.goal_key(unique_name)))
    store.redis.set(store.goal_key(unique_name), json.dumps({**record, "code_sha": foreign_sha}))

    model.deploy()
    redeployed = store.require_goal(unique_name)
    assert redeployed.generation > goal.generation and redeployed.code_sha == goal.code_sha
    assert unpack(store.get_code(redeployed.code_sha), cluster_secret())[0] is not None
    model.deploy()                                        # now it is nothing to do
    assert store.require_goal(unique_name).generation == redeployed.generation
    assert model.get_handle().remote("ann").result(timeout=30) == "hi ann"


# ------------------------------------------------------------------ ids that become paths


def test_a_replica_record_under_a_path_like_id_writes_nothing_outside_the_agents_data_dir(connected, unique_name):
    # A writer to Redis copies a real (signed) replica record under the id ../../outside/escaped:
    # the agent's log would be <data dir>/logs/../../outside/escaped.log.
    taskserve.deployment(name=unique_name, version="1")(Greeter).deploy()
    store = taskserve.connect(connected.url)
    (real,) = store.replicas_of(unique_name)
    outside = connected.workdir / "outside"
    assert (connected.workdir / real.node_id / "logs").is_dir()      # the agent's log dir, two levels below
    outside.mkdir(exist_ok=True)
    evil_id = "../../outside/escaped"
    fields = {**real.to_fields(), "replica_id": evil_id, "state": "PENDING", "desired": "run", "pid": "",
              "message": ""}
    store.redis.hset(store.replica_key(evil_id), mapping=fields)
    store.redis.sadd(store.node_replicas_key(real.node_id), evil_id)
    store.notify(f"node:{real.node_id}")
    try:
        record = wait_until(lambda: (found := store.get_replica(evil_id)) is not None
                            and found.state != ReplicaState.PENDING and found,
                            timeout=60, message="the agent to act on the record")
        assert sorted(path.name for path in outside.iterdir()) == []
        assert record.state == ReplicaState.FAILED and "invalid replica id" in record.message, record
    finally:
        store.update_replica(evil_id, desired="stop")      # had it started, its agent drains it
        wait_until(lambda: store.get_replica(evil_id).is_gone, timeout=60, message="the record to be gone")
        store.redis.srem(store.node_replicas_key(real.node_id), evil_id)
        store.redis.delete(store.replica_key(evil_id))


# ------------------------------------------------------------------ signed goals


def _rewrite_goal(store, name: str, **options) -> None:
    """What anyone with the Redis password (and not the secret) can do to a goal: change
    options in its JSON, leaving ``spec_hash`` alone so that nothing rolls, then move its
    revision and notify, as a real write does."""
    key = store.goal_key(name)
    record = json.loads(store.redis.get(key))
    record["options"].update(options)
    store.redis.set(key, json.dumps(record))
    store.redis.hincrby(store.REVISIONS_KEY, name, 1)
    store.redis.publish(EVENTS_CHANNEL, f"goal:{name}")


class _ForgedAnswers(threading.Thread):
    """The attack's second half: for every call queued for ``name``, a pickled "result"
    (which would run ``marker``'s command when unpickled) under that call's id."""

    def __init__(self, client: redis.Redis, name: str, marker: Path) -> None:
        super().__init__(daemon=True)
        self.client, self.name = client, name
        self.payload = base64.b64encode(pickle.dumps(Marker(marker))).decode()
        self.stopping = threading.Event()
        self.forged: set[str] = set()

    def run(self) -> None:
        while not self.stopping.wait(0.01):
            for item in self.client.lrange(queue_name(self.name), 0, -1):
                task_id = json.loads(item)["headers"]["id"]
                if task_id in self.forged:
                    continue
                record = json.dumps({"status": "SUCCESS", "task_id": task_id, "traceback": None, "children": [],
                                     "result": {PICKLED_RESULT: self.payload, "signature": "0" * 64}})
                self.client.set(result_key(task_id), record)
                self.client.publish(result_key(task_id), record)
                self.forged.add(task_id)


def _refusal(handle) -> str:
    """The error a call through ``handle`` is refused with ("" while it is still sent)."""
    try:
        handle.remote("ann")
    except SignatureError as error:
        return str(error)
    return ""


def test_a_goal_rewritten_without_the_secret_is_refused_by_every_reader(connected, unique_name, tmp_path):
    """The attack of the issue: switch a goal to pickle without the secret (its spec_hash
    left alone, so nothing rolls) and answer the next calls with a pickled "result". The
    gateway drops the route, handles refuse to call, the controller plans nothing and says
    why, the other deployments go on, and nothing is ever unpickled."""
    model = taskserve.deployment(name=unique_name, version="1")(Greeter)
    bystander = taskserve.deployment(name=f"{unique_name}-b", version="1")(Greeter)
    model.deploy()
    bystander.deploy()
    handle = model.get_handle()
    assert handle.remote("ann").result(timeout=30) == "hi ann"
    store = taskserve.connect(connected.url)
    pids = replica_pids(unique_name)
    marker = tmp_path / "ran"
    forger = _ForgedAnswers(store.redis, unique_name, marker)
    forger.start()
    try:
        with running_gateway(connected) as http:
            wait_until(lambda: f"/{unique_name}" in http.get("/-/routes").json(), timeout=30,
                       message="the gateway to route the deployment")
            _rewrite_goal(store, unique_name, serializer="pickle")

            wait_until(lambda: f"/{unique_name}" not in http.get("/-/routes").json(), timeout=30,
                       message="the gateway to drop the route of the unsigned goal")
            assert http.post(f"/{unique_name}", json="ann").status_code == 404
            assert f"/{unique_name}-b" in http.get("/-/routes").json()
            refusal = wait_until(lambda: _refusal(handle), timeout=30, message="the handle to refuse the goal")
            assert "goal not signed with the cluster secret" in refusal and "\n" not in refusal
            with pytest.raises(SignatureError, match="goal not signed"):
                taskserve.get_deployment(unique_name).get_handle()
            status = wait_until(lambda: model.status() if model.status().status == "UNHEALTHY" else None,
                                timeout=30, message="the controller to refuse the goal")
            assert status.message == GOAL_NOT_SIGNED
            assert bystander.get_handle().remote("bo").result(timeout=30) == "hi bo"
            assert bystander.status().status == "HEALTHY"
    finally:
        forger.stopping.set()
        forger.join(timeout=10)
    assert not marker.exists(), "a pickled answer was unpickled"
    assert replica_pids(unique_name) == pids, "nothing was planned for the unsigned goal"

    model.deploy(timeout=60)                   # a deploy with the secret signs it again
    assert handle.remote("ann").result(timeout=30) == "hi ann"
    assert model.status().status == "HEALTHY" and replica_pids(unique_name) == pids
    model.delete()
    bystander.delete()


def _goal(name: str, version: str = "1") -> Goal:
    return Goal(name=name, generation=0, version=version, spec_hash=f"spec-{version}", num_replicas=1,
                options={"num_cpus": 1, "serializer": "json"}, code_sha=f"code-{version}", init_sha="init",
                user_version=version)


def test_the_controller_plans_only_signed_goals_and_signs_what_it_writes():
    store = Store(fakeredis.FakeRedis())
    store.register_node(Node("node-a", Resources(num_cpus=8)), ttl_s=60)
    store.update_goal("good", signed(lambda previous: _goal("good")), "deploy", missing_ok=True)
    store.update_goal("forged", lambda previous: _goal("forged"), "deploy", missing_ok=True)
    store.update_goal("foreign", lambda previous: sign_goal(_goal("foreign"), ClusterSecret.parse("another")),
                      "deploy", missing_ok=True)
    controller = Controller(store, secret=RUN_SECRET)
    controller._lead(store.acquire_lease(controller.controller_id, 60))
    controller.reconcile_once()
    assert len(store.replicas_of("good")) == 1
    for name in ("forged", "foreign"):
        health = store.get_health(name)
        assert store.replicas_of(name) == [] and health.status == DeploymentState.UNHEALTHY
        assert health.message == GOAL_NOT_SIGNED and health.outcome == "failed"
        assert health.observed_generation == store.get_goal(name).generation

    # What the controller writes itself is signed, and built only on signed goals.
    failed = store.update_goal("good", signed(lambda previous: _goal("good", "2")), "deploy")
    controller._roll_back(failed, "constructor failed 3 times", "Traceback ...")
    restored = store.get_goal("good")
    assert restored.version == "1" and check_goal(restored, RUN_SECRET) is restored
    store.update_goal("forged", lambda previous: _goal("forged", "2"), "deploy")
    unsigned_failure = store.get_goal("forged")
    controller._roll_back(unsigned_failure, "constructor failed 3 times", "Traceback ...")
    assert store.get_goal("forged") == unsigned_failure, "no rollback built on an unsigned goal"
    assert not any(e["action"] == "auto-rollback" for e in store.history("forged"))


def test_the_route_table_holds_only_signed_goals(caplog):
    store = Store(fakeredis.FakeRedis())
    store.update_goal("good", signed(lambda previous: _goal("good")), "deploy", missing_ok=True)
    store.update_goal("forged", lambda previous: _goal("forged"), "deploy", missing_ok=True)
    assert read_routes(store, RUN_SECRET).to_dict() == {"/good": "good"}
    assert read_routes(store, RUN_SECRET).to_dict() == {"/good": "good"}
    said = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert len(said) == 1 and GOAL_NOT_SIGNED in said[0] and "no route" in said[0], "logged once"


def _as_an_earlier_taskserve_wrote_it(store, name: str, **options) -> None:
    """Make ``name``'s goal one an earlier taskserve wrote: no signature, the count in its
    options too, no history of signed goals."""
    key = store.goal_key(name)
    record = json.loads(store.redis.get(key))
    del record["signature"]
    record["options"].update(num_replicas=record["num_replicas"], **options)
    store.redis.delete(store.history_key(name))
    store.redis.set(key, json.dumps(record))
    store.redis.hincrby(store.REVISIONS_KEY, name, 1)
    store.redis.publish(EVENTS_CHANNEL, f"goal:{name}")


def test_goals_of_an_earlier_taskserve_are_signed_where_their_code_vouches_for_them(connected, unique_name):
    """After an upgrade, `taskserve up` signs the goals an earlier version wrote, but only
    where the code's sealed manifest agrees with them (an earlier agent checked the same)."""
    kept = taskserve.deployment(name=unique_name, version="1")(Greeter)
    flipped = taskserve.deployment(name=f"{unique_name}-p", version="1")(Greeter)
    kept.deploy()
    flipped.deploy()
    store = taskserve.connect(connected.url)
    pids = replica_pids(unique_name)
    _as_an_earlier_taskserve_wrote_it(store, unique_name)
    _as_an_earlier_taskserve_wrote_it(store, f"{unique_name}-p", serializer="pickle")   # not what its code says
    wait_until(lambda: kept.status().message == GOAL_NOT_SIGNED, timeout=30, message="the legacy goal refused")

    outcome = taskserve.api.sign_legacy_goals()
    assert outcome[unique_name] == ""
    assert "serializer" in outcome[f"{unique_name}-p"] and "refused" in outcome[f"{unique_name}-p"]
    wait_until(lambda: kept.status().status == "HEALTHY", timeout=30, message="the signed goal to be planned")
    assert kept.get_handle().remote("ann").result(timeout=30) == "hi ann"
    assert replica_pids(unique_name) == pids and kept.status().num_replicas == 1
    with pytest.raises(SignatureError, match="goal not signed"):
        flipped.get_handle()
    # A goal blanked by hand once signed goals were written is not signed again.
    _rewrite_goal(store, unique_name, request_timeout_s=1)
    store.redis.set(store.goal_key(unique_name),
                    json.dumps({**json.loads(store.redis.get(store.goal_key(unique_name))), "signature": ""}))
    assert "changed since by hand" in taskserve.api.sign_legacy_goals()[unique_name]
    kept.delete()
    flipped.delete()


# ------------------------------------------------------------------ signed user_config


def test_a_user_config_signature_binds_the_value_the_deployment_and_the_code():
    mac = sign_user_config("model", "c0de", {"t": (1, 2)}, SECRET)
    check_user_config("model", "c0de", {"t": [1, 2]}, mac, SECRET)      # as Redis gives it back
    check_user_config("model", "c0de", {"t": [1, 2]}, mac, ClusterSecret.parse("new,the-right-secret"))
    for deployment, code_sha, value in (("other", "c0de", {"t": [1, 2]}), ("model", "other", {"t": [1, 2]}),
                                        ("model", "c0de", {"t": [1, 3]})):
        with pytest.raises(SignatureError, match="does not match"):
            check_user_config(deployment, code_sha, value, mac, SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        check_user_config("model", "c0de", {"t": [1, 2]}, mac, ClusterSecret.parse("guessed"))
    with pytest.raises(SignatureError, match="not signed"):
        check_user_config("model", "c0de", {"t": [1, 2]}, "", SECRET)


class Configurable:
    """Answers with its config and pid; remembers every config reconfigure() got."""

    def __init__(self):
        self.seen = []

    def reconfigure(self, config):
        self.seen.append(config)

    def __call__(self):
        return [self.seen[-1] if self.seen else None, os.getpid()]

    def history(self):
        return self.seen


def _replica(store, name: str):
    [replica] = [r for r in store.replicas_of(name) if r.state.value == "RUNNING"]
    return replica


def test_a_user_config_written_to_redis_by_hand_is_refused_and_never_reaches_reconfigure(connected, unique_name):
    model = taskserve.deployment(name=unique_name, version="1", user_config={"t": 1})(Configurable)
    model.deploy()
    handle = model.get_handle()
    store = taskserve.connect(connected.url)
    before = _replica(store, unique_name)
    evil = {"t": 666}

    # 1. Into the replica's record, with the controller paused (else it puts the goal's back
    # at once): unsigned, then with a valid signature of another deployment (a replay).
    controller = connected.processes["controller"]
    controller.send_signal(signal.SIGSTOP)
    try:
        replayed = {"t": 667}      # another value: a refused one is not looked at twice
        for value, signature, refusal in ((evil, "", "not signed"),
                                          (replayed, sign_user_config(unique_name + "-x", before.code_sha, replayed,
                                                                      cluster_secret()), "does not match")):
            store.set_replica_config(before.replica_id, json.dumps(value), config_hash(value), signature)
            error = wait_until(lambda: store.get_replica(before.replica_id).config_error, timeout=30,
                               message="the replica to refuse the config")
            assert refusal in error and "\n" not in error and "taskserve reconfigure" in error
            assert handle.remote().result(timeout=10) == [{"t": 1}, before.pid]      # serving, as before
    finally:
        controller.send_signal(signal.SIGCONT)
    wait_until(lambda: store.get_replica(before.replica_id).config_hash == before.config_hash and
               model.status().status == "HEALTHY", timeout=30, message="the controller to restore the goal's config")

    # 2. Into the goal, as reconfigure_deployment does but without the secret: the goal is
    # not signed, so the controller plans nothing (the replica keeps its config) and says
    # why; a deploy with the secret signs the deployment's goal again.
    store.update_goal(unique_name, lambda previous: {"options": {**previous.options, "user_config": evil}},
                      "reconfigure")
    wait_until(lambda: model.status().message == GOAL_NOT_SIGNED, timeout=30,
               message="the controller to refuse the unsigned goal")
    assert model.status().status == "UNHEALTHY"
    assert store.get_replica(before.replica_id).config_hash == before.config_hash
    with pytest.raises(SignatureError, match="goal not signed"):
        taskserve.reconfigure_deployment(unique_name, {"t": 2}, wait=False)       # built on nothing unsigned
    model.deploy(timeout=60)
    assert model.status().status == "HEALTHY"
    assert taskserve.get_deployment(unique_name).user_config == {"t": 1}
    assert handle.history.remote().result(timeout=10) == [{"t": 1}]         # reconfigure never saw 666
    assert replica_pids(unique_name) == {before.pid}

    # 3. A rollback does not sign what someone without the secret wrote into the history: a
    # goal written while the controller did not look, and replaced by a signed one since.
    controller.send_signal(signal.SIGSTOP)
    try:
        store.update_goal(unique_name, lambda previous: {"options": {**previous.options, "user_config": evil}},
                          "reconfigure")
    finally:
        controller.send_signal(signal.SIGCONT)
    model.options(user_config={"t": 5}).deploy(timeout=60)
    assert handle.remote().result(timeout=10)[0] == {"t": 5}
    with pytest.raises(SignatureError, match="cannot roll .* back to version 1: its goal not signed"):
        taskserve.rollback_deployment(unique_name, wait=False)
    assert handle.history.remote().result(timeout=10) == [{"t": 1}, {"t": 5}]
    model.delete()


def test_signed_reconfigure_and_rollback_still_work_in_place(connected, unique_name):
    model = taskserve.deployment(name=unique_name, version="1", user_config={"t": 1})(Configurable)
    model.deploy()
    handle = model.get_handle()
    pids = replica_pids(unique_name)
    taskserve.reconfigure_deployment(unique_name, {"t": 2}, timeout=60)
    assert handle.remote().result(timeout=10)[0] == {"t": 2}
    model.options(user_config={"t": 3}).deploy(timeout=60)
    assert handle.remote().result(timeout=10)[0] == {"t": 3}
    assert taskserve.rollback_deployment(unique_name, timeout=60) == "1"
    assert handle.remote().result(timeout=10)[0] == {"t": 2}
    assert handle.history.remote().result(timeout=10) == [{"t": 1}, {"t": 2}, {"t": 3}, {"t": 2}]
    assert replica_pids(unique_name) == pids                                 # all in place
    # A replica started now checks the rolled-back config's signature at its start.
    taskserve.scale_deployment(unique_name, 2, timeout=60)
    assert {config["t"] for config, _ in (handle.remote().result(timeout=10) for _ in range(20))} == {2}
    model.delete()


# ------------------------------------------------------------------ passwords in every output


@pytest.mark.integration
def test_the_password_shows_in_no_output(tmp_path, unique_name):
    password = generate_password()
    cluster = Cluster(tmp_path / "cluster", redis_password=password)
    try:
        cluster.start_redis()
        assert password in cluster.url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=cluster.redis.port).ping()
        taskserve.connect(cluster.url)
        cluster.start_controller("--resync", "0.5")
        cluster.start_agent("node-a", 4)

        model = taskserve.deployment(name=unique_name, version="1")(Greeter)
        model.deploy()
        assert model.get_handle().remote("bo").result(timeout=30) == "hi bo"
        env = cluster.env()

        def cli(args: list[str]) -> str:
            run = subprocess.run([sys.executable, "-m", "taskserve", *args], capture_output=True, text=True,
                                 env=env, cwd=REPO, timeout=120)
            return run.stdout + run.stderr

        with concurrent.futures.ThreadPoolExecutor(4) as pool:     # independent commands: at once
            outputs = list(pool.map(cli, (
                ["status"], ["status", unique_name], ["status", "--json"], ["list"], ["history", unique_name],
                ["call", unique_name, '"x"'], ["status", "--address", cluster.url.replace("/0", "/99x")],
                ["status", f"--address={cluster.url.replace('redis://', 'nope://')}"])))
        with running_gateway(cluster) as http:
            for path in ("/-/metrics", "/-/status", "/-/dashboard", "/-/routes", f"/{unique_name}"):
                outputs.append(http.get(path).text)
        outputs.append(json.dumps(taskserve.connect(cluster.url).history(unique_name)))
        outputs.append(taskserve.connection.describe_address())
        for part in cluster.processes.values():
            outputs.append(Path(f"/proc/{part.pid}/cmdline").read_bytes().decode(errors="replace"))
        cluster.stop_all()
        outputs += [path.read_text(errors="replace") for path in cluster.log_dir.rglob("*.log")]
        leaked = [text[:300] for text in outputs if password in text]
        assert not leaked
    finally:
        cluster.stop_all()


@pytest.mark.slow
@pytest.mark.integration
def test_up_generates_a_password_and_a_secret_and_shows_neither(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TASKSERVE_ADDRESS", "TASKSERVE_SECRET", "TASKSERVE_SECRET_FILE")}
    env["HOME"] = str(tmp_path)                 # its registry of running clusters
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log = open(tmp_path / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "taskserve", "up", "--no-example", "--http-port", "0"],
                          cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    data = tmp_path / ".taskserve"
    try:
        wait_until(lambda: "taskserve is up" in (tmp_path / "up.log").read_text() or up.poll() is not None,
                   timeout=90, message="taskserve up to start")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        url = (data / "address").read_text().strip()
        password = redis.connection.parse_url(url)["password"]
        assert password and len(password) >= 32
        for name in ("address", "secret"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        port = redis.connection.parse_url(url)["port"]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()                    # no password: refused
        client = redis.Redis.from_url(url)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        # A client here finds the address and the secret through the files, and deploys.
        deploy = subprocess.run([sys.executable, "-m", "taskserve", "deploy", "taskserve.examples.echo:Echo"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert deploy.returncode == 0, deploy.stderr
        status = subprocess.run([sys.executable, "-m", "taskserve", "status"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert "echo" in status.stdout
        command_lines = []
        for proc in Path("/proc").iterdir():
            try:
                command_lines.append((proc / "cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
        shown = (tmp_path / "up.log").read_text() + status.stdout + status.stderr + deploy.stdout + deploy.stderr
        shown += "".join(p.read_text(errors="replace") for p in (data / "logs").rglob("*.log"))
        assert password not in shown
        assert not [line for line in command_lines if password in line]
        secret = (data / "secret").read_text().strip()
        assert secret not in shown and not [line for line in command_lines if secret in line]
    finally:
        up.terminate()
        up.wait(timeout=120)
        log.close()


@pytest.mark.integration
def test_the_append_only_file_and_the_redis_log_are_private(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "redis.log").write_text("an older log\n")
    (data / "redis.log").chmod(0o644)                  # as an earlier version left it
    with RedisServer(data_dir=data) as server:
        client = redis.Redis(port=server.port)
        client.set("goal", "everything the cluster runs")
        client.bgrewriteaof()
        wait_until(lambda: not int(client.info("persistence")["aof_rewrite_in_progress"]), timeout=30,
                   message="the rewrite of the append-only file")
        client.set("after", "the rewrite")
        client.close()
    written = sorted(data.rglob("*"))
    assert any(path.name.startswith("appendonly") for path in written), written
    loose = {str(path.relative_to(data)): oct(stat.S_IMODE(path.stat().st_mode))
             for path in written if stat.S_IMODE(path.stat().st_mode) & 0o077}
    assert loose == {}


def test_a_non_loopback_redis_needs_a_password():
    with pytest.raises(ValueError, match="needs a password"):
        RedisServer(host="0.0.0.0")


# ------------------------------------------------------------------ what the CLI prints


HOSTILE = ("\x1b]8;;https://evil.example/\x1b\\update here\x1b]8;;\x1b\\ \x1b[2J\x1b]0;owned\x07"
           "[link=https://evil.example/]click[/link] [blink]x[/blink]")


@pytest.mark.integration
def test_status_and_list_print_what_redis_holds_as_plain_text(tmp_path):
    # A writer to Redis puts terminal escapes (an OSC-8 link, a screen clear, a title) and
    # rich markup (a fake link) in a status message, a version, a replica's message and a
    # host name; the CLI must show them as text, with no escape reaching the terminal.
    from taskserve.connection import make_store
    from taskserve.state import DeploymentHealth, DeploymentState, Goal, Node, Replica, Resources

    with RedisServer() as server:
        store = make_store(server.url)
        store.write_goal("victim", lambda _: Goal(name="victim", generation=1, version="v1" + HOSTILE,
                                                  spec_hash="s", num_replicas=1, options={}, code_sha="c",
                                                  init_sha="i"))
        store.set_health("victim", DeploymentHealth(status=DeploymentState.UNHEALTHY, message=HOSTILE))
        store.create_replica(Replica(replica_id="victim-1", deployment="victim", spec_hash="s",
                                     version="v1" + HOSTILE, node_id="n1", state=ReplicaState.FAILED,
                                     message=HOSTILE))
        store.register_node(Node(node_id="n1", total=Resources(1), hostname="box" + HOSTILE), 60)
        env = {**os.environ, "TASKSERVE_ADDRESS": server.url, "PYTHONPATH": str(REPO)}
        shown = []
        for args in (["status"], ["status", "victim"], ["list"]):
            run = subprocess.run([sys.executable, "-m", "taskserve", *args], capture_output=True, text=True,
                                 env=env, cwd=tmp_path, timeout=60)
            assert run.returncode == 0, run.stderr
            shown.append(run.stdout + run.stderr)
            assert "\x1b" not in run.stdout + run.stderr and "\x07" not in run.stdout + run.stderr, args
            assert "[link=https://evil.example/]click[/link]" in run.stdout, (args, run.stdout)
        assert "]8;;https://evil.example/" in shown[1]         # the escape's text, harmless without its ESC


# ------------------------------------------------------------------ the dashboard


class Hostile:
    def __init__(self):
        raise ValueError('<img src=x onerror="window.__owned=1"><script>window.__owned=2</script>')


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no /usr/bin/chromium; apt-get install chromium")
@pytest.mark.integration
def test_dashboard_shows_hostile_text_as_text_and_versions_as_given(tmp_path, unique_name):
    from playwright.sync_api import sync_playwright

    from .test_dashboard import CHROMIUM, CHROMIUM_ARGS

    cluster = start_cluster(tmp_path / "cluster")
    try:
        taskserve.deployment(name=unique_name, version="v1")(Greeter).deploy()
        with pytest.raises(taskserve.DeploymentError):
            taskserve.deployment(name=unique_name + "-x", version="v1")(Hostile).deploy(timeout=90)
        with running_gateway(cluster) as http:
            url = str(http.base_url) + "/-/dashboard"
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector(f'[data-deployment="{unique_name}-x"] .message')
                assert page.evaluate("window.__owned") is None
                assert "<img src=x" in page.inner_text(f'[data-deployment="{unique_name}-x"] .message')
                versions = page.locator(f'[data-deployment="{unique_name}"] .replica .version').all_inner_texts()
                assert versions and set(versions) == {"v1"}
                browser.close()
    finally:
        cluster.shutdown()


def test_gateway_sends_no_traceback_without_debug(connected, unique_name):
    class Broken:
        def __call__(self, request):
            raise ValueError("secret-internal-detail")

    taskserve.deployment(name=unique_name)(Broken).deploy()
    with running_gateway(connected) as http:
        answer = http.get(f"/{unique_name}")
    assert answer.status_code == 500 and "traceback" not in answer.json()
    assert "Traceback" not in answer.text and "File \"" not in answer.text


# ------------------------------------------------------------------ the gateway: hosts and memory


def test_the_gateway_answers_only_the_hosts_it_listens_for(connected):
    # DNS rebinding: a page from evil.example, its name now resolving to 127.0.0.1, sends
    # Host: evil.example:PORT to the local gateway. It must not read /-/api/status or call anything.
    with running_gateway(connected) as http:
        port = http.base_url.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert http.get("/-/routes", headers={"host": host}).status_code == 200, host
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", "0.0.0.0"):
            for path in ("/-/api/status", "/-/healthz", "/any-deployment"):
                answer = http.get(path, headers={"host": host})
                assert answer.status_code == 421, (host, path, answer.status_code)
                assert answer.json()["error"] == "MisdirectedRequest" and repr(host) in answer.json()["message"]
    with running_gateway(connected, "--allowed-host", "api.internal", "--allowed-host", "gw.example") as http:
        for host in ("api.internal", f"API.internal:{http.base_url.port}", "gw.example", "127.0.0.1"):
            assert http.get("/-/routes", headers={"host": host}).status_code == 200, host
        assert http.get("/-/routes", headers={"host": "evil.example"}).status_code == 421


class HeldUntilReleased:
    """Notes each request it gets, then answers once the file ``release`` exists (bounded)."""

    def __init__(self, started: str, release: str) -> None:
        self.started, self.release = started, release

    def __call__(self, request):
        with open(self.started, "a") as out:
            out.write(f"{len(request.body)}\n")
        deadline = time.monotonic() + 60
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(request.body)


def test_the_gateway_bounds_the_request_bodies_it_holds_at_once(connected, unique_name, tmp_path):
    # 40-60 concurrent 10 MB POSTs took a gateway to 3.7 GB: it now holds at most
    # --max-inflight-bytes of bodies, and refuses the rest with 503 + Retry-After.
    MiB = 2**20
    started, release = tmp_path / "started", tmp_path / "release"
    started.touch()
    taskserve.deployment(name=unique_name, max_concurrent_queries=8, request_timeout_s=120)(
        HeldUntilReleased).deploy(str(started), str(release))

    def count_started() -> int:
        return len(started.read_text().splitlines())

    with running_gateway(connected, "--max-inflight-bytes", str(7 * MiB), "--max-body-size", str(2 * MiB)) as http:
        wait_until(lambda: http.get("/-/routes").json().get(f"/{unique_name}"), timeout=30, message="the route")
        answers: list = []

        def post(body: bytes) -> None:
            answers.append(http.post(f"/{unique_name}", content=body, timeout=120))

        def post_held(size: int, count: int = 1) -> list[threading.Thread]:
            threads = [threading.Thread(target=post, args=(b"x" * size,)) for _ in range(count)]
            for thread in threads:
                thread.start()
            return threads

        held = post_held(2 * MiB, 3)                                     # 6 MiB held
        wait_until(lambda: count_started() == 3, timeout=60, message="three requests held by the replica")
        # A chunked body is counted as it arrives: refused once it would pass 7 MiB.
        chunked = http.post(f"/{unique_name}", content=iter([b"y" * MiB] * 2), timeout=60)
        assert chunked.status_code == 503 and chunked.headers["retry-after"] == "1", chunked.text
        assert chunked.json()["error"] == "Overloaded" and "--max-inflight-bytes" in chunked.json()["message"]
        held += post_held(MiB)                                           # exactly 7 MiB: taken
        wait_until(lambda: count_started() == 4, timeout=60, message="the fourth request held")
        # With a Content-Length that does not fit: refused before a byte of the body is read.
        for body in (b"z" * (2 * MiB), b"z", iter([b"z"])):
            refused = http.post(f"/{unique_name}", content=body, timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert count_started() == 4
        release.touch()
        for thread in held:
            thread.join(timeout=120)
        assert sorted(answer.json() for answer in answers) == [MiB, 2 * MiB, 2 * MiB, 2 * MiB]
        # Answered bodies are given back: the gateway takes as much again.
        assert http.post(f"/{unique_name}", content=b"x" * (2 * MiB), timeout=60).json() == 2 * MiB
    taskserve.delete_deployment(unique_name)


# ------------------------------------------------------------------ shutdown under load


class Recorder:
    """Writes each request's token to a file when it starts, then works half a second."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, request):
        token = request.json()["token"]
        with open(self.path, "a") as out:
            out.write(f"{token}\n")
        time.sleep(0.5)     # the work itself
        return {"token": token}


@pytest.mark.integration
def test_stopping_under_load_answers_every_caller_and_runs_no_request_it_said_failed(tmp_path, unique_name):
    # The issue: SIGTERM to `taskserve up` with 60 requests in flight gave plain-text 500s, and
    # requests whose callers got them ran after the restart. Now the gateway stops first:
    # each caller gets its answer, or a JSON 503 naming its request, which then never runs.
    from taskserve.store import queue_name
    from taskserve.store.keys import UNACKED_KEY

    ran = tmp_path / "ran"
    ran.touch()
    with RedisServer() as server:          # outlives the cluster: what is left queued can be seen
        cluster = Cluster(tmp_path / "cluster", redis_url=server.url)
        try:
            cluster.start_redis()
            taskserve.connect(server.url)
            cluster.start_controller("--resync", "0.5")
            cluster.start_agent("node-a", 4)
            taskserve.deployment(name=unique_name, request_timeout_s=120)(Recorder).deploy(str(ran))
            port = free_port()
            cluster.start_gateway(port)
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180)
            wait_until(lambda: http.get("/-/routes").json().get(f"/{unique_name}"), timeout=30, message="the route")
            answers: dict[int, object] = {}

            def call(token: int) -> None:
                try:
                    answers[token] = httpx.post(f"http://127.0.0.1:{port}/{unique_name}", json={"token": token},
                                                timeout=180)
                except httpx.HTTPError as error:
                    answers[token] = error

            callers = [threading.Thread(target=call, args=(token,)) for token in range(60)]
            for caller in callers:
                caller.start()

            def in_flight() -> float:
                for line in http.get("/-/metrics").text.splitlines():
                    if line.startswith("taskserve_http_requests_in_flight{") and f'"{unique_name}"' in line:
                        return float(line.rsplit(" ", 1)[1])
                return 0.0

            wait_until(lambda: in_flight() + len(answers) >= 60, timeout=90, message="every request in flight")
            wait_until(lambda: len(ran.read_text().splitlines()) >= 3, timeout=60, message="requests to run")
            cluster.stop_all()               # what `taskserve up` does on SIGTERM
            for caller in callers:
                caller.join(timeout=180)
        finally:
            cluster.stop_all()
        started = [int(line) for line in ran.read_text().splitlines()]
        kinds: dict[str, list[int]] = {"ok": [], "refused": [], "other": []}
        for token, answer in sorted(answers.items()):
            if isinstance(answer, httpx.Response) and answer.status_code == 200 and answer.json() == {"token": token}:
                kinds["ok"].append(token)
            elif isinstance(answer, httpx.Response) and answer.status_code == 503 \
                    and answer.headers.get("content-type") == "application/json" \
                    and answer.json()["error"] == "ShuttingDown" and answer.json()["request_id"] in answer.text:
                kinds["refused"].append(token)
            else:
                kinds["other"].append(token)
        others = {token: getattr(answers[token], "text", repr(answers[token]))[:200] for token in kinds["other"]}
        assert len(answers) == 60 and not others, others
        assert kinds["refused"], "the gateway never had to refuse: the load was too light to show anything"
        assert sorted(started) == kinds["ok"]                  # each answered request ran once, no refused one
        client = redis.Redis.from_url(server.url)
        assert client.llen(queue_name(unique_name)) == 0       # nothing left to run after a restart
        assert client.hlen(UNACKED_KEY) == 0



SECRETLESS_CALLER = """
import os, sys
import taskserve
taskserve.connect(sys.argv[1])
print(taskserve.get_deployment(sys.argv[2]).get_handle().remote("plain data").result(timeout=30))
try:
    taskserve.get_deployment(sys.argv[3]).get_handle()
except taskserve.errors.SignatureError as error:
    print("refused:", error)
"""


@pytest.mark.integration
def test_a_caller_without_the_secret_makes_json_calls_but_never_pickled_ones(connected, unique_name, tmp_path):
    plain = taskserve.deployment(_echo).options(name=f"{unique_name}-json", num_cpus=0.1)
    plain.deploy()
    pickled = taskserve.deployment(_echo).options(name=f"{unique_name}-pickle", num_cpus=0.1, serializer="pickle")
    pickled.deploy()
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, "TASKSERVE_SECRET_FILE")}
    env["PYTHONPATH"] = str(REPO)
    script = tmp_path / "caller.py"
    script.write_text(SECRETLESS_CALLER)
    done = subprocess.run([sys.executable, str(script), connected.url, plain.name, pickled.name], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "plain data"
    assert lines[1].startswith("refused:") and "serializer='pickle'" in lines[1] and "TASKSERVE_SECRET" in lines[1]
    plain.delete()
    pickled.delete()


def _echo(x):
    return x
