"""Every shell and Python block of README.md, docs/*.md and deploy/kubernetes/README.md runs,
against one real local cluster.

The cluster is what ``taskserve up`` leaves: Redis, a controller, an agent, a gateway and
the example ``echo`` deployed; ``127.0.0.1:8000`` in a block is its gateway. The blocks of
one page run in document order, in a directory of the page's own that looks like the
repository's root (its files are linked there; ``.taskserve/address`` holds the cluster's
address), so what a page writes stays out of the checkout:

- its Python blocks run in one interpreter and share one namespace, as if they were one
  script: a block may use what an earlier block of the page imported or defined;
- each shell block runs in a fresh ``bash -euo pipefail``, where ``curl`` fails on an HTTP
  error status, so a command that fails fails its block;
- a block right after ``<!-- file: NAME -->`` is written to the file NAME (after a syntax
  check for Python) for later blocks of the page to use, as in "``models.py``:";
- a block right after ``<!-- no-test: REASON -->`` is skipped with that reason: it needs
  something a test cannot have here (several machines, docker, a cluster on port 8000)::

    <!-- no-test: needs docker -->
    ```bash
    docker compose up
    ```

A block that fails (an exception, a non-zero exit, no end within ``BLOCK_TIMEOUT_S``) fails
its test, which names the page, the line and the block's first line; the later blocks of
that page do not run. After each page, the deployments it left are deleted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

import taskserve

from .helpers import REPO, Cluster, start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "kubernetes" / "README.md"]
BLOCK = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(no-test|file):\s*(.*?)\s*-->\s*$")
RUNNABLE = ("bash", "sh", "python")
BLOCK_TIMEOUT_S = 45
EXAMPLE = "echo"      # deployed before the pages run, as `taskserve up` does; never deleted
# Shell blocks run after this: curl fails on an HTTP error instead of printing the body.
SHELL_PRELUDE = 'curl() { command curl --fail-with-body --show-error "$@"; }\n'


@dataclass(frozen=True)
class Block:
    """One fenced block of a document that the test runs, writes or skips."""

    document: Path
    line: int                  # of the opening fence
    language: str
    code: str
    skip: Optional[str] = None      # the reason of its no-test marker
    file: Optional[str] = None      # the name of its file marker

    @property
    def id(self) -> str:
        """``docs/canary.md:36``"""
        return f"{shown(self.document)}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")


def shown(document: Path) -> str:
    """The path of ``document`` as the failures name it: relative to the repository if in it."""
    return str(document.relative_to(REPO)) if document.is_relative_to(REPO) else str(document)


def blocks(document: Path) -> Iterator[Block]:
    """The shell and Python blocks of ``document`` and its blocks with a file marker, in order.

    >>> [b.language for b in blocks(REPO / "README.md")][:2]
    ['bash', 'bash']
    """
    text = document.read_text()
    for match in BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").splitlines()
        marker = MARKER.search(before[-1]) if before else None
        kind, value = (marker.group(1), marker.group(2)) if marker else (None, None)
        if match.group(1) in RUNNABLE or kind == "file":
            yield Block(document, text[:match.start()].count("\n") + 1, match.group(1), match.group(2),
                        skip=value if kind == "no-test" else None, file=value if kind == "file" else None)


ALL_BLOCKS = [block for document in DOCUMENTS for block in blocks(document)]


# ---- the runner: one process per page, started by the test below ---------------------------

class BlockTimeout(Exception):
    pass


class ShellFailed(Exception):
    """A shell block exited non-zero; the message is its exit code and output."""


def _on_alarm(signum: int, frame: object) -> None:
    raise BlockTimeout(f"the block did not end within {BLOCK_TIMEOUT_S} s")


def run_python(block: Block, namespace: dict) -> str:
    """Run ``block`` in ``namespace``; its output. Tracebacks name the document and its line."""
    # Blank lines first, so that a traceback's line number is the document's.
    code = compile("\n" * block.line + block.code, shown(block.document), "exec")
    output = io.StringIO()
    signal.alarm(BLOCK_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            exec(code, namespace)
    finally:
        signal.alarm(0)
    return output.getvalue()


def run_shell(block: Block, gateway_port: int) -> str:
    """Run ``block`` in bash; its output. A non-zero exit raises with the output."""
    code = SHELL_PRELUDE + block.code.replace("127.0.0.1:8000", f"127.0.0.1:{gateway_port}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)
    if result.returncode != 0:
        raise ShellFailed(f"exit {result.returncode}\n{result.stdout}")
    return result.stdout


def run_page(document: Path, gateway_port: int, report: Path) -> None:
    """Run the blocks of ``document`` in order in the current directory, one JSON line per
    block in ``report``; stop at the first that fails."""
    signal.signal(signal.SIGALRM, _on_alarm)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(document):
        if block.skip:
            continue
        started, ok = time.monotonic(), True
        try:
            if block.file:
                if block.language == "python":
                    compile(block.code, block.file, "exec")
                Path(block.file).write_text(block.code)
                output = f"wrote {block.file}"
            elif block.language == "python":
                output = run_python(block, namespace)
            else:
                output = run_shell(block, gateway_port)
        except ShellFailed as error:
            ok, output = False, str(error)
        except BaseException as error:  # reported as the block's failure, with the traceback
            ok, output = False, "".join(traceback.format_exception(error))
        with report.open("a") as out:
            out.write(json.dumps({"line": block.line, "ok": ok, "output": output[-4000:],
                                  "seconds": round(time.monotonic() - started, 2)}) + "\n")
        if not ok:
            return


# ---- the tests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockResult:
    """What one block did, as the page's runner reported it."""

    line: int
    ok: bool
    output: str
    seconds: float


@pytest.fixture(scope="module")
def docs_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int]]:
    """A cluster with a gateway and the example deployed, as `taskserve up` leaves one."""
    from taskserve.examples.echo import Echo
    from taskserve.redis_server import free_port

    cluster = start_cluster(tmp_path_factory.mktemp("docs-cluster"))
    port = free_port()
    try:
        cluster.start_gateway(port)
        Echo.deploy(timeout=60)
        yield cluster, port
    finally:
        cluster.shutdown()


def page_directory(root: Path, cluster: Cluster) -> Path:
    """Make ``root`` look like the repository's root where `taskserve up` runs: the
    repository's files linked, and ``.taskserve/address``."""
    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    data_dir = root / ".taskserve"
    data_dir.mkdir(mode=0o700)
    (data_dir / "address").write_text(cluster.url + "\n")
    return root


def delete_deployments_but_the_example() -> None:
    for name in sorted(taskserve.list_deployments()):
        if name != EXAMPLE:
            taskserve.delete_deployment(name, timeout=30)


# The page's process: ``run_page(document, gateway_port, report)``.
RUNNER = ("import sys; from pathlib import Path; from tests.test_docs import run_page; "
          "run_page(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))")


@pytest.fixture(scope="module")
def page_results(docs_cluster: tuple[Cluster, int], tmp_path_factory: pytest.TempPathFactory):
    """``results(document)``: what each block of the page did (by line), the page run once."""
    cluster, port = docs_cluster
    cache: dict[Path, dict[int, BlockResult]] = {}

    def run(document: Path) -> dict[int, BlockResult]:
        root = tmp_path_factory.mktemp(document.stem)
        report = root / "report.jsonl"
        workdir = root / "page"
        workdir.mkdir()
        page_directory(workdir, cluster)
        runnable = [b for b in blocks(document) if not b.skip]
        env = {**cluster.env(), "HOME": str(workdir),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        try:
            page = subprocess.run([sys.executable, "-c", RUNNER, str(document), str(port), str(report)],
                                  cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S * len(runnable) + 30)
            trailer = f"\n--- the page's own output\n{page.stdout[-2000:]}{page.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            trailer = "\n--- the page did not end in time"
        finally:
            taskserve.connect(cluster.url)
            delete_deployments_but_the_example()
        results = {}
        for line in report.read_text().splitlines() if report.exists() else []:
            result = BlockResult(**json.loads(line))
            results[result.line] = result if result.ok else BlockResult(**{**asdict(result), "output": result.output + trailer})
        return results

    def results(document: Path) -> dict[int, BlockResult]:
        if document not in cache:
            cache[document] = run(document)
        return cache[document]

    return results


def test_every_block_is_found_and_every_skip_has_a_reason():
    assert len(ALL_BLOCKS) >= 20
    assert all(block.skip for block in ALL_BLOCKS if block.skip is not None)
    assert all(block.file for block in ALL_BLOCKS if block.file is not None)
    assert {block.document for block in ALL_BLOCKS} >= {REPO / "README.md", REPO / "docs" / "canary.md"}


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[block.id for block in ALL_BLOCKS])
def test_block_runs(block: Block, page_results) -> None:
    if block.skip:
        pytest.skip(block.skip)
    results = page_results(block.document)
    result = results.get(block.line)
    if result is None:
        failed = [r for r in results.values() if not r.ok]
        reason = (f"an earlier block of the page failed ({shown(block.document)}:{failed[0].line})"
                  if failed else "the page's runner ended before it")
        pytest.fail(f"{block.id} `{block.first_line}` did not run: {reason}")
    assert result.ok, (f"{block.id} `{block.first_line}` failed after {result.seconds} s:\n{block.code}"
                       f"\n--- output\n{result.output}")


def run_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> list[dict]:
    page = tmp_path / "probe.md"
    page.write_text(text)
    report = tmp_path / "report.jsonl"
    report.unlink(missing_ok=True)
    monkeypatch.chdir(tmp_path)
    run_page(page, 1, report)
    return [json.loads(line) for line in report.read_text().splitlines()]


def test_a_failing_python_block_fails_and_stops_its_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = run_probe(tmp_path, monkeypatch, "```python\nvalue = 2\n```\n\n```python\nassert value == 3, value\n```\n"
                                               "\n```python\nprint('not run')\n```\n")
    assert [(r["line"], r["ok"]) for r in results] == [(1, True), (5, False)]
    assert f'{tmp_path / "probe.md"}", line 6' in results[1]["output"]
    assert "AssertionError: 2" in results[1]["output"]


def test_a_shell_block_fails_on_a_failing_command_and_an_http_error(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to a GET
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        results = run_probe(tmp_path, monkeypatch, f"```bash\necho ok\n```\n\n```bash\ncurl -s {url}\n```\n")
        assert [(r["line"], r["ok"]) for r in results] == [(1, True), (5, False)]
        assert "exit 22" in results[1]["output"]
        results = run_probe(tmp_path, monkeypatch, "```sh\nfalse | cat\necho unreachable\n```\n")
        assert [(r["ok"], "unreachable" in r["output"]) for r in results] == [(False, False)]
    finally:
        server.shutdown()
