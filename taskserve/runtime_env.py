"""Runtime environments, the client's half: what a deploy sends.

``runtime_env={"pip": [...], "env_vars": {...}, "working_dir": "dir"}``

:func:`resolve` turns a runtime_env into what travels in the goal: a requirements
file becomes its list of lines, and ``working_dir`` is zipped (without
``.gitignore``d files and ``__pycache__``) and replaced by a content-addressed
``taskserve-pkg://<sha256>.zip`` that is uploaded with the goal. Each node builds
and unpacks them with :mod:`taskserve.node.envs`; :func:`env_key` names the
environment a pip list gets there.

Example::

    >>> normalize_pip(["requests==2.31.0 ", "# a comment", ""])
    ['requests==2.31.0']
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

import pathspec

from .state import PACKAGE_SCHEME

MAX_WORKING_DIR_BYTES = 100 * 2**20



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
    """Zip ``directory`` (less ``.gitignore``d files and ``__pycache__``); return ``(sha256, zip)``.

    A symbolic link to a file inside the directory is packed as that file; one that
    points outside it is refused (``ValueError``) rather than followed.
    """
    root = Path(str(directory)).expanduser()
    if not root.is_dir():
        raise ValueError(f"runtime_env['working_dir'] is {str(directory)!r}, which is not a directory; "
                         "pass the path of a local directory")
    ignore = _ignore_spec(root)
    inside = root.resolve()
    files = []
    total = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or relative.startswith(".git/") or ignore.match_file(relative):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(inside):
            # Following it would ship a file from elsewhere (~/.ssh/id_rsa, say) to every node.
            raise ValueError(
                f"runtime_env['working_dir'] {str(directory)!r} holds a symbolic link {relative!r} to "
                f"{os.readlink(path)!r}, outside the directory: refused, nothing is shipped; copy what it "
                "points to into the directory, or list the link in its .gitignore"
            )
        if not path.is_file():
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


def env_key(pip: list[str], python: str = sys.executable) -> str:
    """Identifies a virtual environment: the requirements and the Python version."""
    version = ".".join(map(str, sys.version_info[:3])) if python == sys.executable else python
    text = json.dumps({"pip": pip, "python": version})
    return hashlib.sha256(text.encode()).hexdigest()[:16]
