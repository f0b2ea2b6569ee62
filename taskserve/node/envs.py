"""Runtime environments, the node's half: cached virtual environments and working dirs.

:class:`EnvironmentCache` builds one virtual environment per distinct ``pip`` list
and Python version (with ``uv``, or ``venv`` + pip without it), once, under a file
lock, and reuses it for every replica of this node; :func:`unpack_working_dir`
unpacks an uploaded working_dir once per node. The client's half, which packs
them, is :mod:`taskserve.runtime_env`.

Example::

    cache = EnvironmentCache(Path(".taskserve/envs"))
    python = cache.ensure(["requests==2.31.0"])    # .../envs/<key>/bin/python
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import filelock

from ..runtime_env import env_key

log = logging.getLogger("taskserve.node.envs")

READY_FILE = "taskserve-env.json"

class EnvironmentBuildError(RuntimeError):
    """The installer failed; the message is its output."""


@dataclass(frozen=True)
class CachedEnvironment:
    key: str
    path: Path
    requirements: list[str]
    created_at: float
    size_bytes: int


class EnvironmentCache:
    """Virtual environments under ``root``, one per distinct pip list, built once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_of(self, key: str) -> Path:
        return self.root / key

    def python_of(self, key: str) -> Path:
        return self.path_of(key) / "bin" / "python"

    def ready(self, key: str) -> bool:
        return (self.path_of(key) / READY_FILE).is_file()

    def ensure(self, pip: list[str], progress: Callable[[str], None] = log.info) -> Path:
        """The Python of the environment for ``pip``, building it first if needed.

        Concurrent calls for the same list, from any process on this machine, build
        it once. Raises :class:`EnvironmentBuildError` with the installer's output.
        """
        key = env_key(pip)
        if self.ready(key):
            return self.python_of(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.root / f"{key}.lock")):
            if self.ready(key):
                return self.python_of(key)
            path = self.path_of(key)
            shutil.rmtree(path, ignore_errors=True)      # a build that died half-way
            started = time.monotonic()
            progress(f"building runtime env {key} for {pip}")
            try:
                _build(path, pip, progress)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            (path / READY_FILE).write_text(json.dumps(
                {"key": key, "requirements": pip, "python": sys.version.split()[0], "created_at": time.time()}))
            progress(f"runtime env {key} ready in {time.monotonic() - started:.1f}s")
        return self.python_of(key)

    def list(self) -> list[CachedEnvironment]:
        environments = []
        if not self.root.is_dir():
            return environments
        for ready in sorted(self.root.glob(f"*/{READY_FILE}")):
            meta = json.loads(ready.read_text())
            size = sum(p.stat().st_size for p in ready.parent.rglob("*") if p.is_file() and not p.is_symlink())
            environments.append(CachedEnvironment(meta["key"], ready.parent, meta["requirements"],
                                                  meta["created_at"], size))
        return environments

    def remove(self, key: str) -> None:
        with filelock.FileLock(str(self.root / f"{key}.lock")):
            shutil.rmtree(self.path_of(key), ignore_errors=True)
        (self.root / f"{key}.lock").unlink(missing_ok=True)


def _build(path: Path, pip: list[str], progress: Callable[[str], None]) -> None:
    uv = _find_uv()
    if uv:
        _run([uv, "venv", "--quiet", "--python", sys.executable, str(path)], progress)
        install = [uv, "pip", "install", "--python", str(path / "bin" / "python"), *pip]
    else:
        _run([sys.executable, "-m", "venv", "--without-pip", str(path)], progress)
        install = [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install",
                   "--disable-pip-version-check", *pip]
    _see_base_packages(path)
    _run(install, progress)


def _find_uv() -> Optional[str]:
    try:
        import uv
        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _see_base_packages(venv: Path) -> None:
    """Let the environment import taskserve and its dependencies from this Python.

    A ``.pth`` file appends this interpreter's site directories after the
    environment's own, so the deployment's packages win over the base ones.
    """
    base_dirs = [d for d in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(d)]
    lines = [f"import site; site.addsitedir({d!r})" for d in base_dirs]
    for site_packages in venv.glob("lib/python*/site-packages"):
        (site_packages / "_taskserve_base.pth").write_text("\n".join(lines) + "\n")


def _run(command: list[str], progress: Callable[[str], None]) -> None:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL)
    output = []
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line.rstrip())
        progress(line.rstrip())
    if process.wait() != 0:
        tail = "\n".join(output[-40:])
        raise EnvironmentBuildError(f"installing the runtime env failed ({Path(command[0]).name} exited with "
                                    f"code {process.returncode}):\n{tail}")


def unpack_working_dir(root: Path, sha: str, fetch: Callable[[], bytes]) -> Path:
    """The directory holding the working_dir ``sha``, unpacked once per node."""
    target = Path(root) / sha
    done = Path(root) / f"{sha}.unpacked"       # beside the directory, not in the user's files
    if done.is_file():
        return target
    Path(root).mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(Path(root) / f"{sha}.lock")):
        if done.is_file():
            return target
        blob = fetch()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise ValueError(f"working_dir package {sha} is corrupt in Redis; deploy it again")
        shutil.rmtree(target, ignore_errors=True)
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            archive.extractall(target)
            for info in archive.infolist():
                mode = info.external_attr >> 16
                if mode:
                    os.chmod(target / info.filename, mode)
        done.write_text(sha)
    return target
