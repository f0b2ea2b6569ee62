"""The fault suite prints its table at the end of the run (and writes it to
``$TASKSERVE_FAULT_TABLE`` when set), for docs/reliability.md."""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("tests.faults.harness")

from .harness import RESULTS, table  # noqa: E402  (after its assertions are set to be rewritten)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    text = table(RESULTS)
    terminalreporter.section("faults under load")
    terminalreporter.write_line(text)
    path = os.environ.get("TASKSERVE_FAULT_TABLE")
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")
