"""The layers are a contract, not a hope: import-linter and ruff over the tree.

The contracts live in pyproject.toml (``[tool.importlinter]``): a user's script
never loads the node agent or the gateway, the planners import no I/O, the agent
does not load the replica's code, the store loads none of the parts that use it.
Each check runs a tool in a process of its own, so these are integration tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from .helpers import REPO

pytestmark = pytest.mark.integration


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports")
    if lint_imports is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter")
    result = subprocess.run([lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_taskserve_loads_neither_node_nor_gateway():
    code = ("import sys, taskserve, taskserve.http; "
            "print(sorted(m for m in sys.modules if m.startswith(('taskserve.node', 'taskserve.gateway'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
