"""Reconfigure in place: how long until every one of 10 replicas serves a new user_config,
against a rolling redeploy of the same replicas.

What it measures
----------------
Everything runs on this machine: an embedded Redis (no persistence), a controller
(``--resync 0.5``) and one node agent offering ``--num-cpus`` (default 16) CPUs,
all started by the script. The deployment has 10 replicas (``--replicas``; ``num_cpus=0.1``,
``version="v1"``) of a class whose ``reconfigure(config)`` stores the config and
whose ``__call__(i)`` returns ``[i, config, os.getpid()]``.

* **reconfigure** (``--updates`` times, default 20): with the same version,
  ``.options(user_config={"n": k}).deploy()``. Timed from the call until

  - ``deploy()`` returned (the controller saw every replica acknowledge
    config ``k``; ``status()`` is then checked: 10 RUNNING replicas, all with
    the same new config hash), and
  - **all 10 answered**: requests sent in pipelined bursts of 30 after
    ``deploy()`` returned, until each of the 10 replica pids has answered with
    config ``k``. An answer with an older config after ``deploy()`` returned is
    counted as ``stale`` (must be 0).

  Reported as p50, p90 and max. The pids answering and listed by ``status()``
  must be the same 10 before, during and after all updates: a reconfigure
  restarts nothing (docs/reference.md, Updates and User configuration).
* **rolling redeploy** (the baseline, ``--rollouts`` times, default 2): a new
  ``version`` with the same config, timed the same way (all 10 *new* pids
  answered).

How to read it
--------------
``reconfigure / rollout`` is the p50 of the reconfigure times over the median
rollout time (both until all 10 answered): how much cheaper a config change is
than restarting the replicas. Both go in batches of at most 2 replicas
(``max_unavailable=0.2``), so a reconfigure costs about 5 control round trips
(controller -> replica -> controller) and a rollout about 5 replica starts.
``pids unchanged`` must say yes.

Usage, from the repository root::

    python -m benchmarks.bench_reconfigure [--num-cpus 16] [--updates 20] [--rollouts 2] [--replicas 10]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_reconfigure --updates 2 --rollouts 1 --replicas 2

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path
printed) only when it fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import taskserve
from benchmarks.common import (
    bench_main,
    cluster,
    deleted_on_exit,
    load_average,
    markdown_table,
    percentile,
    print_head,
)

NAME = "bench_reconfigure"
REPLICAS = 10
NUM_CPUS = 0.1
BURST = 30
RESULT_TIMEOUT_S = 30.0
CONFIRM_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 300.0


class Configured:
    """The benchmark's model: answers with the config it runs and its pid."""

    def __init__(self) -> None:
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, i: int) -> list:
        return [i, self.config, os.getpid()]


def model(version: str, config: dict, replicas: int) -> taskserve.Deployment:
    return taskserve.deployment(Configured).options(
        name=NAME, num_replicas=replicas, version=version, num_cpus=NUM_CPUS, user_config=config)


# --------------------------------------------------------------------------- confirming


@dataclass(frozen=True)
class Confirmation:
    seconds: float          # since the deploy() call, until every pid answered with the config
    pids: frozenset[int]    # every pid that answered
    stale: int              # answers with another config
    requests: int


def confirm_all_answer(handle: taskserve.DeploymentHandle, config: dict, expected: set[int],
                       started: float) -> Confirmation:
    """Send bursts until every pid in ``expected`` answered with ``config``."""
    deadline = time.monotonic() + CONFIRM_TIMEOUT_S
    seen: set[int] = set()
    answered: set[int] = set()
    stale = requests = 0
    while not expected <= seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"within {CONFIRM_TIMEOUT_S:.0f}s only {sorted(seen)} of {sorted(expected)} "
                               f"answered with {config}")
        responses = [handle.remote(i) for i in range(BURST)]
        for i, response in enumerate(responses):
            number, got, pid = response.result(timeout=RESULT_TIMEOUT_S)
            if number != i:
                raise AssertionError(f"request {i} came back as {number}")
            answered.add(pid)
            if got == config:
                seen.add(pid)
            else:
                stale += 1
        requests += BURST
    return Confirmation(time.perf_counter() - started, frozenset(answered), stale, requests)


def running_replicas(deployment: taskserve.Deployment) -> list[taskserve.ReplicaInfo]:
    return [r for r in deployment.status().replicas if r.state == "RUNNING"]


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Update:
    kind: str               # "reconfigure" or "rollout"
    label: str
    deploy_s: float         # until deploy() returned
    confirmed: Confirmation
    status_ok: bool         # every replica RUNNING, one config hash, the new one
    pids: frozenset[int]    # RUNNING pids in status() after the update


def timed_update(deployment: taskserve.Deployment, kind: str, label: str, config: dict,
                 expected_pids: Optional[set[int]], previous_hash: str, replicas: int) -> Update:
    """``deploy()`` then confirm by answers; ``expected_pids`` None means the new replicas."""
    started = time.perf_counter()
    deployment.deploy(timeout=DEPLOY_TIMEOUT_S)
    deploy_s = time.perf_counter() - started
    running = running_replicas(deployment)
    hashes = {r.config_hash for r in running}
    status_ok = len(running) == replicas and len(hashes) == 1 and (kind == "rollout" or hashes != {previous_hash})
    pids = frozenset(r.pid for r in running if r.pid)
    expected = set(expected_pids) if expected_pids is not None else set(pids)
    confirmed = confirm_all_answer(deployment.get_handle(), config, expected, started)
    return Update(kind, label, deploy_s, confirmed, status_ok, pids)


def config_hash(deployment: taskserve.Deployment) -> str:
    return next(iter({r.config_hash for r in running_replicas(deployment)}), "")


def measure_reconfigures(updates: int, replicas: int) -> tuple[list[Update], frozenset[int]]:
    """``updates`` in-place config changes of the v1 replicas; also their initial pids."""
    first = model("v1", {"n": 0}, replicas)
    first.deploy(timeout=DEPLOY_TIMEOUT_S)
    initial = frozenset(r.pid for r in running_replicas(first) if r.pid)
    if len(initial) != replicas:
        raise RuntimeError(f"expected {replicas} RUNNING replicas after the first deploy, got {len(initial)}")
    confirm_all_answer(first.get_handle(), {"n": 0}, set(initial), time.perf_counter())
    results = []
    for n in range(1, updates + 1):
        config = {"n": n}
        update = timed_update(model("v1", config, replicas), "reconfigure", f"n={n}", config, set(initial),
                              config_hash(first), replicas)
        results.append(update)
        print(f"  reconfigure n={n}: deploy() {update.deploy_s * 1000:.0f} ms, all answered "
              f"{update.confirmed.seconds * 1000:.0f} ms, stale {update.confirmed.stale}", flush=True)
    return results, initial


def measure_rollouts(count: int, config: dict, replicas: int) -> list[Update]:
    results = []
    for k in range(count):
        version = f"v{k + 2}"
        update = timed_update(model(version, config, replicas), "rollout", version, config, None, "", replicas)
        results.append(update)
        print(f"  rollout to {version}: deploy() {update.deploy_s:.2f} s, all answered "
              f"{update.confirmed.seconds:.2f} s", flush=True)
    return results


# --------------------------------------------------------------------------- report


def summary_row(label: str, values_s: list[float]) -> list[str]:
    ordered = sorted(values_s)
    return [label, str(len(ordered)), f"{statistics.median(ordered) * 1000:.0f}",
            f"{percentile(ordered, 0.9) * 1000:.0f}", f"{ordered[-1] * 1000:.0f}"]


def report(reconfigures: list[Update], rollouts: list[Update], initial: frozenset[int], replicas: int) -> None:
    print(f"\nload {load_average()} (1/5/15 min) at the end\n")
    rows = [
        summary_row("reconfigure: deploy() returned", [u.deploy_s for u in reconfigures]),
        summary_row(f"reconfigure: all {replicas} answered", [u.confirmed.seconds for u in reconfigures]),
        summary_row("rolling redeploy: deploy() returned", [u.deploy_s for u in rollouts]),
        summary_row(f"rolling redeploy: all {replicas} answered", [u.confirmed.seconds for u in rollouts]),
    ]
    print(markdown_table([f"update of {replicas} replicas", "n", "p50 ms", "p90 ms", "max ms"], rows))
    reconfigure_p50 = statistics.median(u.confirmed.seconds for u in reconfigures)
    rollout_median = statistics.median(u.confirmed.seconds for u in rollouts)
    pids_unchanged = all(u.pids == initial and u.confirmed.pids == initial for u in reconfigures)
    stale = sum(u.confirmed.stale for u in reconfigures)
    status_ok = all(u.status_ok for u in reconfigures + rollouts)
    rollout_new = all(not (u.pids & initial) for u in rollouts)
    print()
    print(markdown_table(["check", "value"], [
        ["reconfigure / rolling redeploy (p50 / median, all answered)", f"{reconfigure_p50 / rollout_median:.3f}"],
        ["replica pids unchanged over all reconfigures (status and answers)", "yes" if pids_unchanged else "NO"],
        ["answers with an older config after deploy() returned", str(stale)],
        [f"status() after each update: {replicas} RUNNING, one new config hash", "yes" if status_ok else "NO"],
        ["rolling redeploys replaced every pid", "yes" if rollout_new else "NO"],
        ["probe requests sent", str(sum(u.confirmed.requests for u in reconfigures + rollouts))],
    ]))
    if not pids_unchanged:
        for u in reconfigures:
            if u.pids != initial or u.confirmed.pids != initial:
                print(f"  {u.label}: status pids {sorted(u.pids)}, answering pids {sorted(u.confirmed.pids)}, "
                      f"initial {sorted(initial)}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-cpus", type=float, default=16, help="CPUs the agent offers (default: 16)")
    parser.add_argument("--updates", type=int, default=20, help="reconfigures timed (default: 20)")
    parser.add_argument("--rollouts", type=int, default=2, help="rolling redeploys timed (default: 2)")
    parser.add_argument("--replicas", type=int, default=REPLICAS,
                        help=f"replicas of the deployment (default: {REPLICAS}; fewer for a quick smoke run)")
    args = parser.parse_args(argv)
    if min(args.updates, args.rollouts, args.replicas) < 1:
        parser.error("--updates, --rollouts and --replicas must be positive")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    with cluster(work_dir, num_cpus=args.num_cpus) as local, deleted_on_exit([NAME]):
        print_head(local.url, f"agent:    --num-cpus {args.num_cpus:g}; logs in {work_dir}")
        reconfigures, initial = measure_reconfigures(args.updates, args.replicas)
        rollouts = measure_rollouts(args.rollouts, {"n": args.updates}, args.replicas)
    report(reconfigures, rollouts, initial, args.replicas)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return bench_main(lambda work_dir: run(args, work_dir), "bench_reconfigure-")


if __name__ == "__main__":
    sys.exit(main())
