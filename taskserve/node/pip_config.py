"""pip's configuration, for uv: the package index settings a machine gives pip, as uv's.

uv does not read ``pip.conf`` or ``PIP_*`` variables, so a node whose pip installs from a
company mirror would send uv to PyPI. :func:`uv_settings` reads the settings pip would use
where packages come from (the ``PIP_*`` variables, then the ``[install]`` and ``[global]``
sections of the files pip reads, in pip's order) and gives them to uv as its own variables.
uv's own configuration wins: a ``UV_*`` variable that is set is never replaced, and when uv
has a configuration file of its own (``UV_CONFIG_FILE``, a user or system ``uv.toml``),
pip's settings are not read at all.

=====================  ============================  ==========================
pip                    uv                            form
=====================  ============================  ==========================
``index-url``          ``UV_INDEX_URL``              one URL
``extra-index-url``    ``UV_EXTRA_INDEX_URL``        URLs, space-separated
``find-links``         ``UV_FIND_LINKS``             locations, comma-separated
``trusted-host``       ``UV_INSECURE_HOST``          hosts, space-separated
``no-index``           the ``--no-index`` flag       (uv has no variable for it)
``cert``               ``SSL_CERT_FILE``             a CA bundle
=====================  ============================  ==========================

Example (no configuration file of pip's or uv's read, only the variables)::

    >>> uv_settings({"PIP_INDEX_URL": "https://mirror.example/simple"}, pip_files=[], uv_files=[])
    ({'UV_INDEX_URL': 'https://mirror.example/simple'}, [])
    >>> uv_settings({"PIP_INDEX_URL": "https://mirror.example/simple", "UV_DEFAULT_INDEX": "https://uv.example"},
    ...             pip_files=[], uv_files=[])
    ({}, [])
"""

from __future__ import annotations

import configparser
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

log = logging.getLogger("taskserve.node.envs")

# pip's option -> (uv's variable, the uv variables that, set, mean uv is configured already, separator)
_AS_UV_VARIABLE = {
    "index-url": ("UV_INDEX_URL", ("UV_INDEX_URL", "UV_DEFAULT_INDEX"), " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", ("UV_EXTRA_INDEX_URL", "UV_INDEX"), " "),
    "find-links": ("UV_FIND_LINKS", ("UV_FIND_LINKS",), ","),
    "trusted-host": ("UV_INSECURE_HOST", ("UV_INSECURE_HOST",), " "),
    "cert": ("SSL_CERT_FILE", ("SSL_CERT_FILE",), " "),
}
OPTIONS = (*_AS_UV_VARIABLE, "no-index")
_TRUE = {"1", "y", "yes", "t", "true", "on"}


def uv_settings(
    environ: Mapping[str, str],
    pip_files: Optional[Sequence[Path]] = None,
    uv_files: Optional[Sequence[Path]] = None,
) -> tuple[dict[str, str], list[str]]:
    """The variables to add to uv's environment and the flags to give ``uv pip install`` so
    that it installs from where pip would. ``pip_files`` are pip's configuration files to
    read (default: :func:`pip_config_files`); ``uv_files`` uv's, whose presence means uv
    is configured already (default: :func:`uv_config_files`).

    >>> uv_settings({"PIP_EXTRA_INDEX_URL": "https://a.example/simple  https://b.example/simple",
    ...              "PIP_FIND_LINKS": "/wheels /more", "PIP_NO_INDEX": "yes"}, pip_files=[], uv_files=[])
    ({'UV_EXTRA_INDEX_URL': 'https://a.example/simple https://b.example/simple', 'UV_FIND_LINKS': '/wheels,/more'}, ['--no-index'])
    """
    if any(path.is_file() for path in (uv_config_files(environ) if uv_files is None else uv_files)):
        return {}, []
    settings = pip_settings(environ, pip_config_files(environ) if pip_files is None else pip_files)
    env: dict[str, str] = {}
    for option, (variable, uv_own, separator) in _AS_UV_VARIABLE.items():
        value = settings.get(option)
        if value and not any(environ.get(name) for name in uv_own):
            env[variable] = separator.join(value.split())
    flags = ["--no-index"] if settings.get("no-index", "").strip().lower() in _TRUE else []
    return env, flags


def pip_settings(environ: Mapping[str, str], files: Sequence[Path]) -> dict[str, str]:
    """pip's value of each of :data:`OPTIONS` that is set, as pip ranks them: a ``PIP_*``
    variable, then ``[install]``, then ``[global]``; of two files, the later one.

    >>> pip_settings({"PIP_TRUSTED_HOST": "mirror.example", "PIP_VERSION": "x"}, [])
    {'trusted-host': 'mirror.example'}
    """
    sections: dict[str, dict[str, str]] = {"global": {}, "install": {}}
    for path in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error, UnicodeDecodeError) as error:
            log.warning("pip configuration file %s cannot be read, so uv is not given its settings: %s",
                        path, error)
            continue
        for section, values in sections.items():
            if parser.has_section(section):
                for key, value in parser.items(section):
                    if value:
                        values[_option_name(key)] = value
    from_environ = {_option_name(name[4:]): value for name, value in environ.items()
                    if name.startswith("PIP_") and value}
    settings: dict[str, str] = {}
    for option in OPTIONS:
        for source in (from_environ, sections["install"], sections["global"]):
            if option in source:
                settings[option] = source[option]
                break
    return settings


def pip_config_files(environ: Mapping[str, str]) -> list[Path]:
    """The configuration files pip reads, lowest priority first (those that do not exist
    included): the system's, the user's (unless ``PIP_CONFIG_FILE`` names a file that
    exists), the Python environment's, then ``PIP_CONFIG_FILE``; none when that is
    ``os.devnull``.

    >>> pip_config_files({"PIP_CONFIG_FILE": os.devnull})
    []
    >>> [str(p) for p in pip_config_files({"HOME": "/home/u", "XDG_CONFIG_DIRS": "/etc/xdg"})][:4]
    ['/etc/xdg/pip/pip.conf', '/etc/pip.conf', '/home/u/.pip/pip.conf', '/home/u/.config/pip/pip.conf']
    """
    named = environ.get("PIP_CONFIG_FILE")
    if named == os.devnull:
        return []
    home = Path(environ.get("HOME") or Path.home())
    system_dirs = [Path(d) for d in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep) if d]
    files = [d / "pip" / "pip.conf" for d in system_dirs] + [Path("/etc/pip.conf")]
    if not (named and Path(named).exists()):
        user_dir = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        files += [home / ".pip" / "pip.conf", user_dir / "pip" / "pip.conf"]
    files.append(Path(sys.prefix) / "pip.conf")
    if named:
        files.append(Path(named))
    return files


def uv_config_files(environ: Mapping[str, str]) -> list[Path]:
    """Where uv looks for a configuration file of its own: ``UV_CONFIG_FILE``, else the
    user's and the system's ``uv.toml``; none when ``UV_NO_CONFIG`` is set.

    >>> uv_config_files({"UV_CONFIG_FILE": "/srv/uv.toml"}), uv_config_files({"UV_NO_CONFIG": "1"})
    ([PosixPath('/srv/uv.toml')], [])
    """
    if environ.get("UV_NO_CONFIG", "").strip().lower() in _TRUE:
        return []
    if environ.get("UV_CONFIG_FILE"):
        return [Path(environ["UV_CONFIG_FILE"])]
    home = Path(environ.get("HOME") or Path.home())
    user_dir = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    system_dirs = [Path(d) for d in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep) if d]
    return [user_dir / "uv" / "uv.toml", *(d / "uv" / "uv.toml" for d in system_dirs), Path("/etc/uv/uv.toml")]


def _option_name(name: str) -> str:
    """pip's name of an option, from a file's key or a variable's suffix: ``INDEX_URL`` ->
    ``index-url``."""
    return name.strip().lower().replace("_", "-")
