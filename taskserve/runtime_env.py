"""Runtime environments: each deployment's own Python packages, env vars and code.

``runtime_env={"pip": [...], "env_vars": {...}, "working_dir": "dir"}``

On the client, :func:`resolve` turns a runtime_env into what travels in the goal:
a requirements file becomes its list of lines, and ``working_dir`` is zipped
(without ``.gitignore``d files and ``__pycache__``) and replaced by a
content-addressed ``taskserve-pkg://<sha256>.zip`` that is uploaded with the goal.

On each node, :class:`EnvironmentCache` builds one virtual environment per distinct
``pip`` list and Python version (with ``uv``, or ``venv`` + pip without it), once,
under a file lock, and reuses it for every replica; :func:`unpack_working_dir`
unpacks a working_dir once per node.

Example::

    >>> normalize_pip(["requests==2.31.0 ", "# a comment", ""])
    ['requests==2.31.0']
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
from typing import Any, Callable, Optional

import filelock
import pathspec

from .state import PACKAGE_SCHEME, package_sha  # noqa: F401 (package_sha is part of this module's API)

log = logging.getLogger("taskserve.runtime_env")

MAX_WORKING_DIR_BYTES = 100 * 2**20
READY_FILE = "taskserve-env.json"


# --------------------------------------------------------------------------- client side


def normalize_pip(pip: Any) -> list[str]:
    """The requirement lines of ``pip``: a list of strings, or a requirements file path."""
    if isinstance(pip, str):
        path = Path(pip)
        if not path.is_file():
            raise ValueError(
                f"runtime_env['pip'] is {pip!r}, which is not a file; pass a list of requirements "
                "like ['requests==2.31.0'] or the path of a requirements file"
            )
        lines = path.read_text().splitlines()
    elif isinstance(pip, (list, tuple)) and all(isinstance(item, str) for item in pip):
        lines = list(pip)
    else:
        raise TypeError(
            f"runtime_env['pip'] is {pip!r}; pass a list of requirement strings or the path of a requirements file"
        )
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def pack_working_dir(directory: Any, limit: int = MAX_WORKING_DIR_BYTES) -> tuple[str, bytes]:
    """Zip ``directory`` (less ``.gitignore``d files and ``__pycache__``); return ``(sha256, zip)``."""
    root = Path(str(directory)).expanduser()
    if not root.is_dir():
        raise ValueError(f"runtime_env['working_dir'] is {str(directory)!r}, which is not a directory; "
                         "pass the path of a local directory")
    ignore = _ignore_spec(root)
    files = []
    total = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or "__pycache__" in path.parts or relative.startswith(".git/") \
                or ignore.match_file(relative):
            continue
        total += path.stat().st_size
        if total > limit:
            raise ValueError(
                f"runtime_env['working_dir'] {str(directory)!r} holds more than {limit // 2**20} MB; "
                "list large files in its .gitignore, or ship them another way"
            )
        files.append((relative, path))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for relative, path in files:
            info = zipfile.ZipInfo(relative, date_time=(1980, 1, 1, 0, 0, 0))  # same content, same sha
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    blob = buffer.getvalue()
    return hashlib.sha256(blob).hexdigest(), blob


def _ignore_spec(root: Path) -> pathspec.GitIgnoreSpec:
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def resolve(runtime_env: Optional[dict]) -> tuple[Optional[dict], list[tuple[str, bytes]]]:
    """The runtime_env as it travels in the goal, and the blobs to upload with it.

    >>> resolve({"pip": ["a==1"], "env_vars": {"X": "1"}})
    ({'env_vars': {'X': '1'}, 'pip': ['a==1']}, [])
    """
    if not runtime_env:
        return runtime_env, []
    resolved: dict[str, Any] = {}
    blobs: list[tuple[str, bytes]] = []
    if runtime_env.get("env_vars"):
        resolved["env_vars"] = dict(runtime_env["env_vars"])
    if runtime_env.get("pip"):
        resolved["pip"] = normalize_pip(runtime_env["pip"])
    working_dir = runtime_env.get("working_dir")
    if working_dir:
        if isinstance(working_dir, str) and working_dir.startswith(PACKAGE_SCHEME):
            resolved["working_dir"] = working_dir        # already uploaded (a redeploy from Redis)
        else:
            sha, blob = pack_working_dir(working_dir)
            resolved["working_dir"] = f"{PACKAGE_SCHEME}{sha}.zip"
            blobs.append((sha, blob))
    return dict(sorted(resolved.items())), blobs


# --------------------------------------------------------------------------- node side


def env_key(pip: list[str], python: str = sys.executable) -> str:
    """Identifies a virtual environment: the requirements and the Python version."""
    version = ".".join(map(str, sys.version_info[:3])) if python == sys.executable else python
    text = json.dumps({"pip": pip, "python": version})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
