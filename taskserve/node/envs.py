"""Runtime environments, the node's half: cached virtual environments and working dirs.

:class:`EnvironmentCache` builds one virtual environment per distinct ``pip`` list
and Python version (with ``uv``, given the machine's pip index settings by
:mod:`taskserve.node.pip_config`, or ``venv`` + pip without it), once, under a file
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
import stat
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import filelock

from ..runtime_env import MAX_WORKING_DIR_BYTES, env_key
from ..state import check_id
from .pip_config import uv_settings

log = logging.getLogger("taskserve.node.envs")

READY_FILE = "taskserve-env.json"

# Bounds on an unpacked working_dir: what a client may pack (runtime_env.MAX_WORKING_DIR_BYTES),
# so that a crafted archive (a zip bomb) cannot fill the node's disk.
MAX_UNPACKED_BYTES = MAX_WORKING_DIR_BYTES
MAX_UNPACKED_FILES = 50_000

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
        return self.root / check_id(key, "runtime env key")

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
        check_id(key, "runtime env key")
        with filelock.FileLock(str(self.root / f"{key}.lock")):
            shutil.rmtree(self.path_of(key), ignore_errors=True)
        (self.root / f"{key}.lock").unlink(missing_ok=True)


def _build(path: Path, pip: list[str], progress: Callable[[str], None]) -> None:
    uv = _find_uv()
    environ: Optional[dict[str, str]] = None
    if uv:
        _run([uv, "venv", "--quiet", "--python", sys.executable, str(path)], progress)
        # uv reads neither pip.conf nor PIP_*: give it the machine's pip index settings as its own.
        added, flags = uv_settings(os.environ)
        if added or flags:
            progress(f"pip configuration given to uv: {', '.join([*sorted(added), *flags])}")
            environ = {**os.environ, **added}
        install = [uv, "pip", "install", *flags, "--python", str(path / "bin" / "python"), *pip]
    else:
        _run([sys.executable, "-m", "venv", "--without-pip", str(path)], progress)
        install = [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install",
                   "--disable-pip-version-check", *pip]
    _see_base_packages(path)
    _run(install, progress, environ)


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


def _run(command: list[str], progress: Callable[[str], None], environ: Optional[dict[str, str]] = None) -> None:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, env=environ)
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
    """The directory holding the working_dir ``sha``, unpacked once per node; ``sha``
    (read from Redis) must be one path component (:func:`~taskserve.state.check_id`)."""
    target = Path(root) / check_id(sha, "working_dir package sha")
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
        try:
            extract_safely(blob, target, what=f"working_dir package {sha}")
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)     # never half a directory
            raise
        done.write_text(sha)
    return target


class UnsafeArchive(ValueError):
    """A working_dir archive that would write outside its directory, write a link,
    or unpack to more than the limits: refused, nothing of it kept."""


def _safe_parts(name: str, what: str) -> tuple[str, ...]:
    """The path components of an archive entry, refusing any that leaves the directory.

    >>> _safe_parts("pkg/mod.py", "x")
    ('pkg', 'mod.py')
    >>> _safe_parts("../../etc/passwd", "the archive")
    Traceback (most recent call last):
    ...
    taskserve.node.envs.UnsafeArchive: the archive has an entry '../../etc/passwd' that would land outside its directory (absolute, '..' or a drive): refused; pack the directory again with taskserve
    """
    parts = tuple(part for part in name.replace("\\", "/").split("/") if part not in ("", "."))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\0" in name \
            or not parts:
        raise UnsafeArchive(f"{what} has an entry {name!r} that would land outside its directory "
                            "(absolute, '..' or a drive): refused; pack the directory again with taskserve")
    return parts


def extract_safely(blob: bytes, target: Path, what: str = "the archive", max_bytes: int = MAX_UNPACKED_BYTES,
                   max_files: int = MAX_UNPACKED_FILES) -> None:
    """Unpack the zip ``blob`` into the new directory ``target``, refusing what is unsafe.

    Refused with :class:`UnsafeArchive`: entries with an absolute path, ``..`` or a
    drive; symbolic links and any other file that is not a plain file or directory;
    more than ``max_files`` entries or ``max_bytes`` unpacked (counted as written, not
    as the archive claims). Permissions are restored without setuid, setgid or sticky
    bits, and only ever on what was just written inside ``target``.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=False, mode=0o700)
    written = 0
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        entries = archive.infolist()
        if len(entries) > max_files:
            raise UnsafeArchive(f"{what} holds {len(entries)} entries, more than the {max_files} allowed: refused")
        for info in entries:
            parts = _safe_parts(info.filename, what)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                link = "a symbolic link" if kind == stat.S_IFLNK else "not a plain file"
                raise UnsafeArchive(f"{what} has an entry {info.filename!r} that is {link}: refused; "
                                    "ship the file it points to instead")
            path = target.joinpath(*parts)
            if info.is_dir() or kind == stat.S_IFDIR:
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL|O_NOFOLLOW: a name given twice, or anything already there, is not written through.
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(descriptor, "wb") as out, archive.open(info) as source:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise UnsafeArchive(f"{what} unpacks to more than {max_bytes // 2**20} MB: refused "
                                            "(a zip bomb?); list large files in the working_dir's .gitignore")
                    out.write(chunk)
                os.fchmod(out.fileno(), (mode & 0o777) or 0o644)   # never setuid, setgid or sticky
