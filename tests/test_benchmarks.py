"""Smoke runs of the benchmarks in ``benchmarks/``: each runs end to end with tiny counts.

Each test starts ``python -m benchmarks.bench_X`` from the repository root, as
benchmarks/README.md says to, and checks its exit code and its report: the
tables are there, every row has figures, and the checks a benchmark makes
itself (no failed request, replica pids unchanged ...) say so. The figures
themselves mean nothing at these counts. All of them together take about a
minute on 2 cores.
"""

from __future__ import annotations

import doctest
import os
import re
import signal
import subprocess
import sys
from typing import Optional

import pytest

from .helpers import REPO

RUN_TIMEOUT_S = 150.0
FLOAT = re.compile(r"\d+(\.\d+)?")


def run_benchmark(module: str, *args: str, env: Optional[dict[str, str]] = None) -> str:
    """Run ``python -m benchmarks.MODULE ARGS`` from the repository root; its stdout.

    Fails the test with the output if it exits with an error or outlasts
    ``RUN_TIMEOUT_S`` (then it gets SIGTERM first, so it stops its cluster in order).
    """
    env = dict(os.environ if env is None else env)
    env.pop("TASKSERVE_ADDRESS", None)   # the benchmark connects to its own cluster
    process = subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=90)
        pytest.fail(f"{module} took more than {RUN_TIMEOUT_S:.0f}s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    assert process.returncode == 0, f"{module} exited with {process.returncode}\n--- stdout\n{stdout}\n" \
                                    f"--- stderr\n{stderr}"
    return stdout


def tables(output: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``output``, each as its rows keyed by the header's cells.

    >>> tables("title\\n| a | b |\\n|---|--:|\\n| x | 1 |\\n| y | 2 |\\n\\n| c |\\n|--:|\\n| 3 |")
    [[{'a': 'x', 'b': '1'}, {'a': 'y', 'b': '2'}], [{'c': '3'}]]
    """
    found: list[list[dict[str, str]]] = []
    lines = output.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|[-:|]+\|", lines[index + 1]) and \
                (index == 0 or not lines[index - 1].startswith("|")):
            header = cells(line)
            rows = []
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, cells(row))))
            found.append(rows)
    return found


def cells(line: str) -> list[str]:
    """The cells of one Markdown table line.

    >>> cells("| a  |  1.0 ok |")
    ['a', '1.0 ok']
    """
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_with(output: str, column: str) -> list[dict[str, str]]:
    """The rows of the first table in ``output`` that has the column ``column``."""
    for rows in tables(output):
        if rows and column in rows[0]:
            return rows
    raise AssertionError(f"no table with a column {column!r} in the report:\n{output}")


def checks(output: str) -> dict[str, str]:
    """A two-column table (``check``/``measure``/``ratio``, ``value``) as a dict."""
    for rows in tables(output):
        if rows and set(rows[0]) in ({"check", "value"}, {"measure", "value"}, {"ratio", "value"}):
            return {next(iter(row.values())): row["value"] for row in rows}
    raise AssertionError(f"no two-column table of values in the report:\n{output}")


def assert_figures(row: dict[str, str], columns: list[str]) -> None:
    """Each of ``columns`` in ``row`` starts with a number."""
    for column in columns:
        assert FLOAT.match(row[column]), f"{column} is {row[column]!r} in {row}"


def test_common_doctests() -> None:
    import benchmarks.common

    result = doctest.testmod(benchmarks.common)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
@pytest.mark.integration
def test_bench_requests() -> None:
    out = run_benchmark("bench_requests", "--requests", "20", "--warmup", "5", "--rounds", "2", "--replicas", "1")
    assert "x1 round 2/2" in out
    figures = table_with(out, "worker CPU us/req")
    assert [(row["path"], row["replicas"]) for row in figures] == \
        [("taskserve", "1"), ("celery", "1"), ("taskserve .echo", "1")]
    for row in figures:
        assert_figures(row, ["p50 ms", "p99 ms", "sequential req/s", "pipelined req/s", "worker CPU us/req"])
    [ratios] = table_with(out, "worker CPU/req taskserve/Celery")
    assert ratios["replicas"] == "1"
    for column, value in ratios.items():
        if column.startswith(("p50", "sequential", "pipelined")):
            assert re.fullmatch(r"\d+\.\d{3} (ok|MISS)", value), f"{column}: {value!r}"


@pytest.mark.slow
@pytest.mark.integration
def test_bench_http() -> None:
    out = run_benchmark("bench_http", "--requests", "40", "--warmup", "4", "--concurrency", "2", "--rounds", "2",
                        "--replicas", "1", "--overload-s", "2", "--overload-concurrency", "32")
    assert "command:  python -m benchmarks.bench_http --requests 40" in out
    figures = table_with(out, "gateway CPU us/req")
    assert [(row["replicas"], row["path"]) for row in figures] == [("1", "http"), ("1", "handle")]
    for row in figures:
        assert_figures(row, ["req/s", "p50 ms", "p99 ms"])
    assert_figures(figures[0], ["gateway CPU us/req"])
    for row in figures:
        assert_figures(row, ["client CPU us/req", "Redis CPU us/req", "total CPU us/req"])
    [ratios] = table_with(out, "throughput http/handle")
    assert_figures(ratios, ["throughput http/handle", "p50 http/handle", "total CPU handle/http"])
    [floor] = table_with(out, "no-op server req/s")
    assert floor["concurrency"] == "2"
    assert_figures(floor, ["no-op server req/s", "p99 ms", "client CPU us/req", "no-op server/handle req/s",
                           "http/no-op server req/s"])


@pytest.mark.slow
@pytest.mark.integration
def test_bench_reconfigure() -> None:
    out = run_benchmark("bench_reconfigure", "--updates", "2", "--rollouts", "1", "--replicas", "2")
    updates = table_with(out, "update of 2 replicas")
    assert [row["n"] for row in updates] == ["2", "2", "1", "1"]
    for row in updates:
        assert_figures(row, ["p50 ms", "p90 ms", "max ms"])
    found = checks(out)
    assert_figures(found, ["reconfigure / rolling redeploy (p50 / median, all answered)"])
    assert found["replica pids unchanged over all reconfigures (status and answers)"] == "yes"
    assert found["answers with an older config after deploy() returned"] == "0"
    assert found["status() after each update: 2 RUNNING, one new config hash"] == "yes"
    assert found["rolling redeploys replaced every pid"] == "yes"


@pytest.mark.slow
@pytest.mark.integration
def test_bench_rollout() -> None:
    out = run_benchmark("bench_rollout", "--noops", "2", "--starts", "1", "--rounds", "1", "--clients", "1",
                        "--work-ms", "5", "--replicas", "2")
    found = checks(out)
    assert found["no-op deploys kept every replica pid"] == "yes"
    assert_figures(found, ["first deploy of 2 replicas, s", "no-op deploy p50, ms (n=2)",
                           "one replica: start p50, s (n=1)"])
    rollouts = table_with(out, "2 new RUNNING")
    assert [row["strategy"] for row in rollouts] == ["stop-first", "max_surge=2"]
    for row in rollouts:
        assert row["failed"] == "0", row
        assert row["2 new RUNNING"] == "yes", row
        assert "!" not in row["min RUNNING"], row      # never below the bound
        assert int(row["answered"]) > 0, row
        assert_figures(row, ["rollout s", "gaps s", "tail s"])


@pytest.mark.slow
@pytest.mark.integration
def test_bench_threads() -> None:
    # Set in the shell, cleared for the cluster: replicas still get the default of 1.
    env = {**os.environ, "OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}
    out = run_benchmark("bench_threads", "--size", "64", "--target-ms", "5", "--requests", "4", "--rounds", "1",
                        env=env)
    setups = {row["setup"]: row for row in table_with(out, "BLAS pool (threadpoolctl)")}
    assert set(setups) == {"omp1 x2", "omp2 x2", "omp2 x1"}
    for name, threads in (("omp1 x2", "1"), ("omp2 x2", "2"), ("omp2 x1", "2")):
        assert setups[name]["OMP_NUM_THREADS"] == threads, setups[name]
        assert setups[name]["BLAS pool (threadpoolctl)"].endswith(f"={threads}"), setups[name]
        assert_figures(setups[name], ["req/s", "compute ms/req", "CPU ms/req"])
    ratios = checks(out)
    assert len(ratios) == 3
    assert_figures(ratios, list(ratios))


@pytest.mark.slow
@pytest.mark.integration
def test_bench_start() -> None:
    out = run_benchmark("bench_start", "--starts", "2")
    starts = {row["start"]: row for row in table_with(out, "p50 ms")}
    assert set(starts) == {"fork server", "plain spawn", "bare Celery worker"}
    for row in starts.values():
        assert row["n"] == "2", row
        assert_figures(row, ["p50 ms", "min ms", "max ms"])
    found = checks(out)
    assert_figures(found, list(found))
    assert re.fullmatch(r"\d+\.\d\d (ok|MISS)", found["fork server / bare Celery (p50, target <= 0.5)"])


@pytest.mark.slow
@pytest.mark.integration
def test_bench_control_plane() -> None:
    out = run_benchmark("bench_control_plane", "--deployments", "20", "--replicas", "3", "--small-replicas", "1",
                        "--nodes", "4", "--passes", "3")
    assert "command:  python -m benchmarks.bench_control_plane --deployments 20" in out
    passes = table_with(out, "round trips")
    assert len(passes) == 6
    for row in passes:
        assert_figures(row, ["p50 ms", "max ms", "pass / baseline"])
    batches = table_with(out, "rolling update batch")
    assert [(row["stopped"], row["started"]) for row in batches] == [("20", "20")] * 5
    gateway = {row["gateway"] for row in table_with(out, "gateway")}
    assert gateway == {"read_routes, first read", "read_routes, nothing changed", "GET /-/routes",
                       "status read, first read", "status read (background), nothing changed",
                       "GET /-/api/status", "GET /-/metrics"}
    found = checks(out)
    [trips] = [value for name, value in found.items() if name.startswith("round trips")]
    assert trips.endswith(" ok"), trips          # the same for 3 and 1 replicas each
    for value in found.values():
        assert value.endswith((" ok", " MISS")), found


@pytest.mark.slow
@pytest.mark.integration
def test_bench_idle() -> None:
    out = run_benchmark("bench_idle", "--replicas", "2", "--seconds", "2", "--baseline-seconds", "1", "--settle", "1")
    assert "command:  python -m benchmarks.bench_idle --replicas 2" in out
    processes = {row["process"]: row for row in table_with(out, "2 replicas: % of a core")}
    for name in ("redis", "controller", "agent", "gateway", "2 replicas", "each replica (mean)", "total"):
        assert_figures(processes[name], ["2 replicas: % of a core"])
    for name in ("redis", "controller", "agent", "gateway", "total"):
        assert_figures(processes[name], ["empty: % of a core"])
    found = checks(out)
    [total] = [value for name, value in found.items() if name.startswith("total with 2 replicas")]
    assert re.fullmatch(r"\d+\.\d{3} (ok|MISS)", total), total
    assert_figures(found, ["empty cluster, % of a core (baseline)"])


@pytest.mark.slow
@pytest.mark.integration
def test_bench_jobs() -> None:
    out = run_benchmark("bench_jobs", "--jobs", "2000", "--batch", "500", "--single", "200", "--rounds", "2",
                        "--drain-jobs", "200", "--drain-rounds", "1", "--calls", "200", "--replicas", "1",
                        "--status-reads", "100")
    assert "command:  python -m benchmarks.bench_jobs --jobs 2000" in out
    submits = {row["submit"]: row for row in table_with(out, "Redis bytes/job - payload")}
    assert set(submits) == {"taskserve submit_many", "floor: LPUSH pipelines, same items", "taskserve submit",
                            "celery send_task"}
    for row in submits.values():
        assert_figures(row, ["jobs/s", "us/job", "client CPU us/job"])
    [drained] = table_with(out, "drain jobs/s")
    assert drained["replicas"] == "1" and drained["drained jobs"] == "200"
    assert_figures(drained, ["drain jobs/s", "plain calls/s", "drain/plain"])
    reads = {row["read"]: row for row in table_with(out, "p50 ms")}
    assert {"job.status(), QUEUED job", "job.status(), SUCCEEDED job"} <= set(reads)
    for row in reads.values():
        assert_figures(row, ["p50 ms", "p99 ms"])
    found = checks(out)
    for name in ("submit_many jobs/s (>= 20000)", "submit one by one / celery send_task (>= 1.0)",
                 "drain / plain calls, 1 replica(s) (>= 1.0)", "job.status() p50 ms (<= 1)"):
        assert re.fullmatch(r"\d+(\.\d+)? (ok|MISS)", found[name]), (name, found[name])


@pytest.mark.slow
@pytest.mark.integration
def test_bench_streaming() -> None:
    out = run_benchmark("bench_streaming", "--requests", "20", "--rounds", "2", "--chunks", "2000",
                        "--stream-rounds", "1", "--streams", "10", "--stream-chunks", "100", "--sleepers", "50",
                        "--sleep-rounds", "1")
    assert "command:  python -m benchmarks.bench_streaming --requests 20" in out
    calls = {row["call (bench_stream, 1 replica)"]: row for row in table_with(out, "call (bench_stream, 1 replica)")}
    assert set(calls) == {"stream: first chunk", "plain call: answer"}
    for row in calls.values():
        assert row["n"] == "20", row
        assert_figures(row, ["p50 ms", "p99 ms"])
    streams = table_with(out, "chunks/s")
    assert [(row["stream"], row["chunks"]) for row in streams] == [
        ("one stream (sync generator)", "2000"), ("10 streams (async generators)", "1000")]
    naps = table_with(out, "naps at once")
    assert [(row["naps at once"], row["nap s"]) for row in naps] == [("50", "0"), ("50", "1")]
    for row in naps:
        assert_figures(row, ["sent after s", "last answer s"])
    assert float(naps[1]["last answer s"]) >= 1.0          # each nap sleeps a second
    found = checks(out)
    assert_figures(found, ["floor: one XADD round trip p50, us", "first chunk p50 / plain call p50"])
    for name, value in found.items():
        if "(<=" in name or "(>=" in name:
            assert re.fullmatch(r"-?\d+(\.\d+)? (ok|MISS)", value), (name, value)
