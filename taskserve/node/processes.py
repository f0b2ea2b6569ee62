"""Small helpers for the processes taskserve starts.

:class:`ProcessHandle` is what a node agent needs of a replica process, whether
``subprocess.Popen`` spawned it or a fork server (:mod:`.forkserver`) forked it.
A replica holds a lock on its in-flight file while it lives (:func:`hold_lock`), so
a restarted agent can tell whether one an earlier agent started still runs
(:func:`lock_held`), however it was started.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Protocol, Union


class ProcessHandle(Protocol):
    """A child process as the node agent uses it; ``subprocess.Popen`` is one.

    ``poll()`` is its exit code once it exited (minus the signal's number if a
    signal ended it), else None; ``send_signal`` does nothing once it exited.
    """

    pid: int

    def poll(self) -> Optional[int]: ...

    def send_signal(self, signum: int) -> None: ...


def hold_lock(path: Union[str, Path]) -> int:
    """Lock the file at ``path`` (creating it) for as long as this process lives.

    Returns the descriptor, which must stay open: the lock goes with the process.
    Raises ``BlockingIOError`` if another process holds it.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "r1.inflight"
    >>> fd = hold_lock(path)
    >>> lock_held(path)       # by this process: another one could not take it
    True
    >>> os.close(fd); lock_held(path)
    False
    """
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def lock_held(path: Union[str, Path]) -> bool:
    """Whether a live process holds the :func:`hold_lock` lock of ``path``."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signum`` to this process when its parent dies.

    Called first thing in replica processes (SIGTERM: they drain) and as the
    ``preexec_fn`` of the processes ``taskserve up`` starts. A no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signum))
    except OSError:
        pass
