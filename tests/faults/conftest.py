"""The fault suite prints its table at the end of the run (and writes it to
``$TASKSERVE_FAULT_TABLE`` when set), for docs/reliability.md.

Under pytest-xdist the rows are made in the workers: each sends its rows to the
controller when it finishes (``workeroutput``), and the controller, which never loads
this file, prints the one table (``tests/conftest.py``).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

pytest.register_assert_rewrite("tests.faults.harness")

from .harness import RESULTS  # noqa: E402  (after its assertions are set to be rewritten)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_rows"] = [asdict(result) for result in RESULTS]
